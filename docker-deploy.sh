#!/usr/bin/env bash
# Docker deployment: two vLLM servers (GPU 1 and 0; one GPU: both on it), the gateway and Redis.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<USAGE
Usage: ./docker-deploy.sh {deploy|build|start|stop|status|logs [service]|key}

  deploy   build the gateway image and start everything (first start prints an API key: see logs)
  build    build the gateway image
  start    start all services (docker compose up -d)
  stop     stop and remove the containers (data/ keeps keys and logs)
  status   container states, then the gateway's /health
  logs     follow the logs (all services, or one: embedding | reranker | gateway | redis)
  key      create an API key named \$NAME (default: user) and print it

Configuration (environment or .env): MODEL_SIZE (0.6B|4B|8B), MODEL_PATH / EMBEDDING_MODEL_PATH /
RERANKER_MODEL_PATH, EMBEDDING_GPU (1) / RERANKER_GPU (0; with one GPU both default to 0 and
its memory is split 0.40 + 0.50), GPU_MEMORY_UTILIZATION (or EMBEDDING_/RERANKER_GPU_MEMORY_UTILIZATION),
MAX_MODEL_LEN, GATEWAY_PORT (2048), GATEWAY_WORKERS (2), RATE_LIMIT (100/minute), VLLM_IMAGE_TAG,
VLLM_API_KEY (the key between the gateway and vLLM; deploy/start generate one into .env, mode 0600,
unless it is set; it is never printed).
USAGE
}

compose() {
  if docker compose version >/dev/null 2>&1; then docker compose "$@"; else docker-compose "$@"; fi
}

# vLLM and the gateway share VLLM_API_KEY (docker-compose.yml). Generated once into .env, which
# compose reads itself, so the key is on no command line and survives redeploys.
ensure_backend_key() {
  [ -n "${VLLM_API_KEY:-}" ] && return
  grep -qE '^VLLM_API_KEY=.+' .env 2>/dev/null && return
  ( umask 077
    touch .env && chmod 600 .env  # it now holds a secret, whoever created it
    sed -i '/^VLLM_API_KEY=$/d' .env
    [ -s .env ] && [ -n "$(tail -c1 .env)" ] && echo >> .env
    printf 'VLLM_API_KEY=%s\n' "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')" >> .env )
  echo "generated VLLM_API_KEY (backend key for vLLM and the gateway) in .env"
}

# Whether VAR is set in the environment or in .env (compose gives the environment precedence, so a
# default exported here must not hide the user's .env).
given() { [ -n "${!1:-}" ] || grep -qE "^$1=.+" .env 2>/dev/null; }
# Its value, from the environment or else .env (empty when neither sets it).
value() { if [ -n "${!1:-}" ]; then printf '%s' "${!1}"; else sed -n "s/^$1=//p" .env 2>/dev/null | tail -n1; fi; }

# A host with one GPU: both models on GPU 0 with its memory split (the defaults, GPUs 1 and 0 at
# 0.90 and 0.97, need two). Only what the user left unset.
one_gpu_defaults() {
  [ "$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)" = 1 ] || return 0
  given EMBEDDING_GPU || export EMBEDDING_GPU=0
  given RERANKER_GPU || export RERANKER_GPU=0
  [ "$(value EMBEDDING_GPU)" = "$(value RERANKER_GPU)" ] || return 0
  if ! given EMBEDDING_GPU_MEMORY_UTILIZATION && ! given RERANKER_GPU_MEMORY_UTILIZATION && ! given GPU_MEMORY_UTILIZATION; then
    export EMBEDDING_GPU_MEMORY_UTILIZATION=0.40 RERANKER_GPU_MEMORY_UTILIZATION=0.50
    echo "one GPU: both models on GPU $(value EMBEDDING_GPU), memory split embedding 0.40 + reranker 0.50"
  fi
}

prepare() {
  ensure_backend_key
  one_gpu_defaults
  mkdir -p data/logs models  # the container's entrypoint gives data/ to its gateway user
}

case "${1:-}" in
  deploy) prepare; compose build gateway; compose up -d
          echo "started; the first API key is printed once in: ./docker-deploy.sh logs gateway";;
  build) compose build gateway;;
  start) prepare; compose up -d;;
  stop) compose down;;
  status) compose ps
          if curl -fsS "http://127.0.0.1:${GATEWAY_PORT:-2048}/health"; then echo; else echo "gateway not healthy"; exit 1; fi;;
  logs) shift; compose logs -f --tail=200 "$@";;
  key) compose exec -u gateway gateway python embedding_reranker_proxy.py keys create --name "${NAME:-user}";;
  -h|--help|"") usage; [ -n "${1:-}" ];;
  *) echo "unknown command '$1'" >&2; usage >&2; exit 2;;
esac
