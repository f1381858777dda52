# The gateway only (vLLM runs in the official vllm/vllm-openai image; see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    ER_HOST=0.0.0.0 ER_PORT=2048 ER_KEYS_FILE=/data/er_api_keys.json ER_LOG_DIR=/data/logs

RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin gateway \
    && mkdir -p /data && chown gateway /data

WORKDIR /app
COPY pyproject.toml README.md embedding_reranker_proxy.py ./
COPY er_gateway ./er_gateway
COPY deploy/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN pip install . && python -c "import er_gateway.app"

# No `USER gateway` here: the entrypoint starts as root only to give a bind-mounted /data (which
# `docker compose up -d` creates root-owned) to the gateway user, then runs the gateway as that user.
VOLUME ["/data"]
EXPOSE 2048
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${ER_PORT}/health" >/dev/null || exit 1
ENTRYPOINT ["docker-entrypoint.sh", "python", "embedding_reranker_proxy.py"]
