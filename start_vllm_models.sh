#!/usr/bin/env bash
# Start Qwen3-Embedding and Qwen3-Reranker as separate `vllm serve` processes.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=scripts/vllm_common.sh
source "$(cd "$(dirname "$0")" && pwd)/scripts/vllm_common.sh"

usage() {
  local key_state="unset: a random key is created once in \$LOG_DIR/vllm_api_key (0600)"
  [ -n "${VLLM_API_KEY:-}" ] && key_state="set (its value is never shown)"
  cat <<EOF
Usage: ./start_vllm_models.sh [--only embedding|reranker] [--restart] [--help]

Starts each model as its own \`vllm serve\` process (own session/process group), logs to
\$LOG_DIR/{embedding,reranker}_model.log, pids to \$LOG_DIR/{embedding,reranker}.pid, and waits
for each /health. Already running -> says so, exit 0. --restart stops running ones first.

Environment (current value):
  MODEL_SIZE                         $MODEL_SIZE   (0.6B|4B|8B: picks the Qwen3 pair)
  EMBEDDING_MODEL_PATH               $EMBEDDING_MODEL_PATH
  RERANKER_MODEL_PATH [MODEL_PATH]   $RERANKER_MODEL_PATH
  EMBEDDING_SERVED_NAME              $EMBEDDING_SERVED_NAME
  RERANKER_SERVED_NAME               $RERANKER_SERVED_NAME
  EMBEDDING_GPU / RERANKER_GPU       $EMBEDDING_GPU / $RERANKER_GPU   (one GPU visible: both 0 unless set;
                                     both on one GPU: memory split 0.40 + 0.50 unless set)
  EMBEDDING_PORT / RERANKER_PORT     $EMBEDDING_PORT / $RERANKER_PORT
  EMBEDDING_GPU_MEMORY_UTILIZATION   $EMBEDDING_GPU_MEMORY_UTILIZATION  [GPU_MEMORY_UTILIZATION]
  RERANKER_GPU_MEMORY_UTILIZATION    $RERANKER_GPU_MEMORY_UTILIZATION  [GPU_MEMORY_UTILIZATION]
  MAX_MODEL_LEN                      $MAX_MODEL_LEN
  DEVICE                             $DEVICE   (auto: cuda when nvidia-smi sees a GPU, else cpu)
  VLLM_BIN                           $VLLM_BIN
  VLLM_HOST                          $VLLM_HOST   (address vLLM listens on; not loopback -> a warning)
  VLLM_API_KEY                       $key_state
                                     key vLLM requires on /v1 paths; given to vLLM in its environment,
                                     never on its command line; a gateway with the same --log-dir and
                                     loopback backend URLs reads the file itself
  VLLM_EXTRA_ARGS, EMBEDDING_EXTRA_ARGS, RERANKER_EXTRA_ARGS   extra \`vllm serve\` arguments
  LOG_DIR                            $LOG_DIR
  HEALTH_TIMEOUT                     $HEALTH_TIMEOUT   (seconds to wait for /health)
  RERANKER_PROMPT                    $RERANKER_PROMPT   (gateway|server|none; must match the gateway's)
  RERANKER_HF_OVERRIDES              Qwen3 original-reranker overrides (set empty for a *-seq-cls checkpoint)
  EMBEDDING_HF_OVERRIDES             extra embedding overrides (JSON); {"is_matryoshka": true} is merged in
                                     so \`dimensions\` works (none: send no overrides)
CPU mode only:
  VLLM_CPU_KVCACHE_SPACE             ${VLLM_CPU_KVCACHE_SPACE:-1}   (GiB of KV cache per server)
  EMBEDDING_CPU_CORES / RERANKER_CPU_CORES   cores bound per server (default: half the cores each)
  DTYPE                              ${DTYPE:-bfloat16 on cpu, model default on cuda}
  ENFORCE_EAGER                      ${ENFORCE_EAGER:-0}   (1: skip torch.compile, faster start)

Exit codes: 0 all requested models healthy (or already running); 1 a model failed to start or
become healthy (last 30 log lines shown); 2 bad usage or configuration; 3 a port is taken by
another program (nothing started).
EOF
}

ONLY="" RESTART=0
while [ $# -gt 0 ]; do
  case "$1" in
    --only) ONLY=${2:-}; shift 2 || { echo "error: --only needs a value" >&2; exit 2; };;
    --only=*) ONLY=${1#--only=}; shift;;
    --restart) RESTART=1; shift;;
    -h|--help) usage; exit 0;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2;;
  esac
done
parse_only "$ONLY"
case "$RERANKER_PROMPT" in gateway|server|none) ;; *) echo "error: RERANKER_PROMPT must be gateway, server or none" >&2; exit 2;; esac
mkdir -p "$LOG_DIR"

if ! command -v "$VLLM_BIN" >/dev/null 2>&1 && [ ! -x "$VLLM_BIN" ]; then
  echo "error: vLLM executable '$VLLM_BIN' not found (install vllm, or set VLLM_BIN)" >&2; exit 2
fi

if [ "$DEVICE" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then DEVICE=cuda; else DEVICE=cpu; fi
fi
case "$DEVICE" in cuda|cpu) ;; *) echo "error: DEVICE must be auto, cuda or cpu" >&2; exit 2;; esac
# A host with one GPU: the default GPU ids (1 and 0) become 0 and 0.
if [ "$DEVICE" = cuda ] && [ "$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)" = 1 ]; then
  case "$GPU_GIVEN" in *e*) ;; *) EMBEDDING_GPU=0;; esac
  case "$GPU_GIVEN" in *r*) ;; *) RERANKER_GPU=0;; esac
fi

VERSION=$("$VLLM_BIN" --version 2>/dev/null | grep -Eo '^[0-9]+\.[0-9]+(\.[0-9]+)?' | tail -n1 || true)
if [ -z "$VERSION" ]; then echo "error: could not read the version of '$VLLM_BIN' (--version)" >&2; exit 2; fi
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }
echo "vLLM $VERSION, device $DEVICE, reranker prompt mode '$RERANKER_PROMPT'"
if [ "$RERANKER_PROMPT" = server ] && ! version_ge "$VERSION" 0.14; then
  echo "error: RERANKER_PROMPT=server needs vLLM >= 0.14 (--chat-template for scoring); use gateway" >&2; exit 2
fi

if [ "$RESTART" = 1 ]; then
  "$ER_ROOT/stop_vllm_models.sh" ${ONLY:+--only "$ONLY"} || true
fi

# Decide what to start; refuse before starting anything if a port is taken by someone else.
TO_START=""
for kind in $KINDS; do
  pidfile=$(model_get "$kind" pidfile); pid=$(pid_from_file "$pidfile"); port=$(model_get "$kind" port)
  if pid_alive "$pid"; then
    echo "$kind model already running (pid $pid, port $port)"; continue
  fi
  if [ -f "$pidfile" ]; then echo "removing stale pid file $pidfile (pid ${pid:-?} is gone)"; rm -f "$pidfile"; fi
  if port_open "$port"; then
    echo "error: port $port ($kind) is already in use by another program; nothing started" >&2; exit 3
  fi
  TO_START="$TO_START $kind"
done
[ -z "$TO_START" ] && exit 0

# Both models on one GPU: the defaults (0.90 + 0.97 of its memory) cannot both fit, so split it,
# unless the other model is neither being started nor running (a single-model host).
if [ "$DEVICE" = cuda ] && [ "$EMBEDDING_GPU" = "$RERANKER_GPU" ]; then
  both=1
  for kind in embedding reranker; do
    case " $TO_START " in *" $kind "*) continue;; esac
    pid_alive "$(pid_from_file "$(model_get "$kind" pidfile)")" || both=0
  done
  if [ "$both" = 1 ] && [ -z "$MEM_GIVEN" ]; then
    EMBEDDING_GPU_MEMORY_UTILIZATION=0.40 RERANKER_GPU_MEMORY_UTILIZATION=0.50
    echo "both models on GPU $EMBEDDING_GPU: memory split embedding 0.40 + reranker 0.50" \
         "(set EMBEDDING_GPU_MEMORY_UTILIZATION / RERANKER_GPU_MEMORY_UTILIZATION to change)"
  elif [ "$both" = 1 ] && awk -v a="$EMBEDDING_GPU_MEMORY_UTILIZATION" -v b="$RERANKER_GPU_MEMORY_UTILIZATION" \
       'BEGIN { exit !(a + b > 0.95) }'; then
    echo "warning: both models on GPU $EMBEDDING_GPU ask for $EMBEDDING_GPU_MEMORY_UTILIZATION + $RERANKER_GPU_MEMORY_UTILIZATION" \
         "of its memory; the second will fail to start (keep the sum <= 0.95)" >&2
  fi
fi

# The backend key reaches vLLM through its environment (VLLM_API_KEY): on the command line it would
# be visible to every local user in `ps`. The generated key is created once, 0600 whatever the
# umask, and reused, so a running gateway keeps working across restarts.
ensure_backend_key() {
  if [ -n "${VLLM_API_KEY:-}" ]; then export VLLM_API_KEY; return; fi
  if [ ! -e "$VLLM_KEY_FILE" ]; then
    local tmp="$VLLM_KEY_FILE.$$"
    ( umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$tmp"; echo >> "$tmp" )
    # ln refuses to replace an existing file: if a concurrent start won, everyone uses its key.
    # (mv -n for file systems without hard links.)
    ln "$tmp" "$VLLM_KEY_FILE" 2>/dev/null || [ -e "$VLLM_KEY_FILE" ] || mv -n "$tmp" "$VLLM_KEY_FILE" || true
    rm -f "$tmp"
  fi
  VLLM_API_KEY=$(known_backend_key)
  if [ -z "$VLLM_API_KEY" ]; then
    echo "error: cannot read a key from $VLLM_KEY_FILE (unreadable or empty); fix or delete it, or set VLLM_API_KEY" >&2
    exit 2
  fi
  export VLLM_API_KEY
}
ensure_backend_key

if ! is_loopback "$VLLM_HOST"; then
  ports=$(for kind in $TO_START; do model_get "$kind" port; done | paste -sd, -)
  cat >&2 <<EOF
warning: VLLM_HOST=$VLLM_HOST: vLLM port(s) $ports are reachable from other machines.
  vLLM's key (VLLM_API_KEY) only protects /v1 paths: /score, /rerank, /tokenize, /pooling and
  /metrics answer anyone who can connect. Firewall the port(s) so only the gateway's host can reach
  them, or keep VLLM_HOST=127.0.0.1 with the gateway on this machine. A gateway on another host needs
  the key too: ER_BACKEND_API_KEY=\$(cat $VLLM_KEY_FILE) (or your VLLM_API_KEY).
EOF
fi

ncores=$(nproc 2>/dev/null || echo 1)
half=$(( ncores / 2 )); [ "$half" -lt 1 ] && half=1
span() { if [ "$1" = "$2" ]; then echo "$1"; else echo "$1-$2"; fi; }
default_cores() {
  if [ "$ncores" -lt 2 ]; then echo 0
  elif [ "$1" = embedding ]; then span 0 $(( half - 1 ))
  else span "$half" $(( ncores - 1 )); fi
}

launch() {
  local kind=$1 args=() envs=()
  local port; port=$(model_get "$kind" port)
  args=(serve "$(model_get "$kind" path)" --host "$VLLM_HOST" --port "$port"
        --served-model-name "$(model_get "$kind" name)" --max-model-len "$MAX_MODEL_LEN")
  if version_ge "$VERSION" 0.10.1; then
    args+=(--runner pooling)
    [ "$kind" = embedding ] && args+=(--convert embed)
  else
    [ "$kind" = embedding ] && args+=(--task embed) || args+=(--task score)
  fi
  if [ "$kind" = embedding ]; then
    local overrides; overrides=$(embedding_overrides) || return 1
    [ -n "$overrides" ] && args+=(--hf-overrides "$overrides")
  fi
  if [ "$kind" = reranker ]; then
    [ -n "$RERANKER_HF_OVERRIDES" ] && args+=(--hf-overrides "$RERANKER_HF_OVERRIDES")
    [ "$RERANKER_PROMPT" = server ] && args+=(--chat-template "$RERANKER_TEMPLATE")
  fi
  if [ "$DEVICE" = cuda ]; then
    args+=(--gpu-memory-utilization "$(model_get "$kind" mem)")
    envs+=(CUDA_VISIBLE_DEVICES="$(model_get "$kind" gpu)")
  else
    local cores
    if [ "$kind" = embedding ]; then cores=${EMBEDDING_CPU_CORES:-$(default_cores embedding)}; else cores=${RERANKER_CPU_CORES:-$(default_cores reranker)}; fi
    args+=(--dtype "${DTYPE:-bfloat16}")
    envs+=(VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" VLLM_CPU_OMP_THREADS_BIND="$cores")
  fi
  [ -n "${DTYPE:-}" ] && [ "$DEVICE" = cuda ] && args+=(--dtype "$DTYPE")
  [ "${ENFORCE_EAGER:-0}" = 1 ] && args+=(--enforce-eager)
  # Extra arguments are whitespace-separated words (split, never globbed; read -d '' ends non-zero).
  local extra=()
  read -r -d '' -a extra <<< "${VLLM_EXTRA_ARGS:-} $(model_get "$kind" extra)" || true
  args+=("${extra[@]}")
  local log; log=$(model_get "$kind" log)
  # The key is already exported (not in envs, which would put it on env's command line); the log
  # only records that it was given.
  { echo "==== $(date '+%F %T') starting: $VLLM_BIN ${args[*]}"
    echo "==== env: ${envs[*]} VLLM_API_KEY=<redacted>"; } >> "$log"
  # setsid: own session and process group, so stop can signal the whole vLLM tree.
  env "${envs[@]}" setsid "$VLLM_BIN" "${args[@]}" >> "$log" 2>&1 < /dev/null &
  echo $! > "$(model_get "$kind" pidfile)"
  echo "started $kind model (pid $!, port $port) -> $log"
}

for kind in $TO_START; do launch "$kind"; done

# Wait for every started server's /health, with progress.
start=$(date +%s); pending="$TO_START"; failed=0
while [ -n "${pending// /}" ]; do
  next=""
  for kind in $pending; do
    pid=$(pid_from_file "$(model_get "$kind" pidfile)"); port=$(model_get "$kind" port)
    if [ "$(http_code "http://$PROBE_HOST:$port/health")" = 200 ]; then
      echo "$kind model healthy on port $port after $(( $(date +%s) - start )) s"
    elif ! pid_alive "$pid"; then
      echo "error: $kind model exited before becoming healthy; last 30 lines of $(model_get "$kind" log):" >&2
      tail -n 30 "$(model_get "$kind" log)" >&2; rm -f "$(model_get "$kind" pidfile)"; failed=1
    elif [ $(( $(date +%s) - start )) -ge "$HEALTH_TIMEOUT" ]; then
      echo "error: $kind model not healthy after $HEALTH_TIMEOUT s; last 30 lines of $(model_get "$kind" log):" >&2
      tail -n 30 "$(model_get "$kind" log)" >&2
      "$ER_ROOT/stop_vllm_models.sh" --only "$kind" >/dev/null 2>&1 || true
      failed=1
    else
      next="$next $kind"
    fi
  done
  pending=$next
  if [ -n "${pending// /}" ]; then
    elapsed=$(( $(date +%s) - start ))
    [ $(( elapsed % 5 )) -eq 0 ] && echo "waiting for${pending} ... ${elapsed}s / ${HEALTH_TIMEOUT}s"
    sleep 1
  fi
done
exit "$failed"
