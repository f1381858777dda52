#!/usr/bin/env bash
# Set up (first time) and run the gateway on 0.0.0.0:2048. Extra arguments go to the gateway:
#   bash scripts/run.sh --embedding-url http://gpu1:8000 --reranker-url http://gpu1:8001
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_gateway.sh
exec .venv/bin/python embedding_reranker_proxy.py "$@"
