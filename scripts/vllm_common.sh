# Shared by start_vllm_models.sh, stop_vllm_models.sh and check_models_status.sh (sourced).
# Resolves the scripts' environment (README, "Scripts"; the first release's names are aliases) and small helpers.
# The variables set here are read by the scripts that source this file, not here:
# shellcheck shell=bash disable=SC2034

ER_ROOT=${ER_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}

MODEL_SIZE=${MODEL_SIZE:-0.6B}
case "$MODEL_SIZE" in 0.6B|4B|8B) ;; *) echo "error: MODEL_SIZE must be 0.6B, 4B or 8B (got '$MODEL_SIZE')" >&2; exit 2;; esac
EMBEDDING_MODEL_PATH=${EMBEDDING_MODEL_PATH:-Qwen/Qwen3-Embedding-$MODEL_SIZE}
RERANKER_MODEL_PATH=${RERANKER_MODEL_PATH:-${MODEL_PATH:-Qwen/Qwen3-Reranker-$MODEL_SIZE}}
EMBEDDING_SERVED_NAME=${EMBEDDING_SERVED_NAME:-Qwen3-Embedding-$MODEL_SIZE}
RERANKER_SERVED_NAME=${RERANKER_SERVED_NAME:-Qwen3-Reranker-$MODEL_SIZE}
# What the user set, before defaults fill in: a one-GPU host only changes what was left unset.
GPU_GIVEN="${EMBEDDING_GPU:+e}${RERANKER_GPU:+r}"
MEM_GIVEN="${EMBEDDING_GPU_MEMORY_UTILIZATION:+e}${RERANKER_GPU_MEMORY_UTILIZATION:+r}${GPU_MEMORY_UTILIZATION:+g}"
EMBEDDING_GPU=${EMBEDDING_GPU:-1}
RERANKER_GPU=${RERANKER_GPU:-0}
EMBEDDING_PORT=${EMBEDDING_PORT:-8000}
RERANKER_PORT=${RERANKER_PORT:-8001}
EMBEDDING_GPU_MEMORY_UTILIZATION=${EMBEDDING_GPU_MEMORY_UTILIZATION:-${GPU_MEMORY_UTILIZATION:-0.90}}
RERANKER_GPU_MEMORY_UTILIZATION=${RERANKER_GPU_MEMORY_UTILIZATION:-${GPU_MEMORY_UTILIZATION:-0.97}}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-8192}
DEVICE=${DEVICE:-auto}
VLLM_BIN=${VLLM_BIN:-vllm}
# Loopback by default: only the gateway on this machine should reach vLLM (README "Backend security").
VLLM_HOST=${VLLM_HOST:-127.0.0.1}
# Where this machine's scripts reach vLLM: a wildcard bind answers on loopback, a specific address
# only on itself.
case "$VLLM_HOST" in 0.0.0.0|::|"[::]") PROBE_HOST=127.0.0.1;; *:*) PROBE_HOST="[$VLLM_HOST]";; *) PROBE_HOST=$VLLM_HOST;; esac
LOG_DIR=${LOG_DIR:-$ER_ROOT/logs}
# Where start_vllm_models.sh keeps the generated backend key; the gateway's --log-dir/vllm_api_key.
VLLM_KEY_FILE=$LOG_DIR/vllm_api_key
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-600}
STOP_TIMEOUT=${STOP_TIMEOUT:-30}
RERANKER_PROMPT=${RERANKER_PROMPT:-gateway}
GATEWAY_URL=${GATEWAY_URL:-http://127.0.0.1:2048}
RERANKER_TEMPLATE=${RERANKER_TEMPLATE:-$ER_ROOT/templates/qwen3_reranker.jinja}

QWEN3_RERANKER_OVERRIDES='{"architectures":["Qwen3ForSequenceClassification"],"classifier_from_token":["no","yes"],"is_original_qwen3_reranker":true}'
# Set to empty for a checkpoint that is already a sequence classifier (e.g. *-seq-cls conversions).
RERANKER_HF_OVERRIDES=${RERANKER_HF_OVERRIDES-$QWEN3_RERANKER_OVERRIDES}
# Qwen3-Embedding is a Matryoshka model (any `dimensions` from 32 up), but its config does not say so
# and vLLM refuses `dimensions` unless told. Merged into the user's own overrides; a user value for
# is_matryoshka or matryoshka_dimensions wins. EMBEDDING_HF_OVERRIDES=none sends no overrides at all.
EMBEDDING_HF_OVERRIDES=${EMBEDDING_HF_OVERRIDES-}
embedding_overrides() {
  [ "$EMBEDDING_HF_OVERRIDES" = none ] && return 0
  python3 -c '
import json, sys
given = json.loads(sys.argv[1] or "{}")
if not isinstance(given, dict):
    sys.exit("EMBEDDING_HF_OVERRIDES must be a JSON object")
if "is_matryoshka" not in given and "matryoshka_dimensions" not in given:
    given["is_matryoshka"] = True
print(json.dumps(given, separators=(",", ":")))' "$EMBEDDING_HF_OVERRIDES"
}

# model_get KIND FIELD -> value (KIND: embedding|reranker)
model_get() {
  local kind=$1 field=$2
  case "$kind:$field" in
    embedding:port) echo "$EMBEDDING_PORT";;   reranker:port) echo "$RERANKER_PORT";;
    embedding:path) echo "$EMBEDDING_MODEL_PATH";; reranker:path) echo "$RERANKER_MODEL_PATH";;
    embedding:name) echo "$EMBEDDING_SERVED_NAME";; reranker:name) echo "$RERANKER_SERVED_NAME";;
    embedding:gpu) echo "$EMBEDDING_GPU";;     reranker:gpu) echo "$RERANKER_GPU";;
    embedding:mem) echo "$EMBEDDING_GPU_MEMORY_UTILIZATION";; reranker:mem) echo "$RERANKER_GPU_MEMORY_UTILIZATION";;
    embedding:extra) echo "${EMBEDDING_EXTRA_ARGS:-}";; reranker:extra) echo "${RERANKER_EXTRA_ARGS:-}";;
    embedding:log) echo "$LOG_DIR/embedding_model.log";; reranker:log) echo "$LOG_DIR/reranker_model.log";;
    embedding:pidfile) echo "$LOG_DIR/embedding.pid";; reranker:pidfile) echo "$LOG_DIR/reranker.pid";;
    *) echo "internal error: model_get $kind $field" >&2; return 1;;
  esac
}

# Which models a command acts on: parse_only VALUE
parse_only() {
  case "${1:-}" in
    "") KINDS="embedding reranker";;
    embedding|reranker) KINDS=$1;;
    *) echo "error: --only takes embedding or reranker (got '$1')" >&2; exit 2;;
  esac
}

pid_from_file() { if [ -f "$1" ]; then tr -dc '0-9' < "$1" || true; fi; }
pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
port_open() { (exec 3<>"/dev/tcp/${PROBE_HOST//[\[\]]/}/$1") 2>/dev/null; }
http_code() { curl -s -o /dev/null -m "${2:-3}" -w '%{http_code}' "$1" 2>/dev/null || true; }

# The backend key, or nothing: VLLM_API_KEY from the environment, else the key file if readable.
# Never prints it anywhere but stdout of this function (for $(...)).
known_backend_key() {
  if [ -n "${VLLM_API_KEY:-}" ]; then printf '%s' "$VLLM_API_KEY"
  elif [ -r "$VLLM_KEY_FILE" ]; then head -n1 "$VLLM_KEY_FILE" | tr -d '[:space:]'
  fi
}

# curl a vLLM URL with the backend key. The header comes from a process substitution (printf is a
# builtin), so the key never appears on curl's command line, where `ps` would show it.
vllm_curl() {
  local key; key=$(known_backend_key)
  if [ -n "$key" ]; then curl -s -m 3 -H @<(printf 'Authorization: Bearer %s\n' "$key") "$@" 2>/dev/null
  else curl -s -m 3 "$@" 2>/dev/null; fi
}

is_loopback() { case "$1" in 127.*|localhost|::1|"[::1]") return 0;; *) return 1;; esac; }

if [ -t 1 ]; then C_OK=$'\e[32m'; C_BAD=$'\e[31m'; C_DIM=$'\e[2m'; C_OFF=$'\e[0m'; else C_OK=; C_BAD=; C_DIM=; C_OFF=; fi
