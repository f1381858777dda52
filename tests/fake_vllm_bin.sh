#!/usr/bin/env bash
# A stand-in `vllm` executable (VLLM_BIN) for fast tests of the launch scripts.
#   FAKE_VLLM_VERSION  what --version prints (default 0.32.0)
#   FAKE_VLLM_MODE     ok (serve with tests/fake_vllm.py) | crash | never (never healthy) | stubborn (ignores SIGTERM)
#   FAKE_VLLM_RECORD   file that gets one line per `serve`: the arguments and CUDA/CPU env
# Like vLLM it listens on --host and, with VLLM_API_KEY in its environment (or --api-key), refuses
# /v1 requests without `Authorization: Bearer <key>` (tests/fake_vllm.py reads the variable itself).
if [ "${1:-}" = "--version" ]; then echo "INFO some log noise"; echo "${FAKE_VLLM_VERSION:-0.32.0}"; exit 0; fi
[ "${1:-}" = serve ] || { echo "fake vllm: unknown command $*" >&2; exit 2; }
shift
echo "ARGS $* ENV CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-} VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-} VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-} VLLM_API_KEY=${VLLM_API_KEY:+<set>}" >> "${FAKE_VLLM_RECORD:-/dev/null}"
port=8000 name=model kind=rerank host=0.0.0.0 passargs=() model=${1:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --host) host=$2; shift;;
    --api-key) passargs+=(--api-key "$2"); shift;;
    --port) port=$2; shift;;
    --served-model-name) name=$2; shift;;
    --max-model-len) passargs+=(--max-model-len "$2"); shift;;
    --convert|--task) [ "$2" = embed ] && kind=embedding; shift;;
  esac
  shift
done
echo "fake vllm starting on $port"
# Like vLLM, a model path that does not exist (and is not a hub name) fails at start.
case "$model" in /nonexistent*)
  echo "OSError: $model is not a local folder and is not a valid model identifier (fake)"; exit 1;; esac
case "${FAKE_VLLM_MODE:-ok}" in
  crash) for i in $(seq 1 40); do echo "log line $i"; done; echo "RuntimeError: CUDA out of memory (fake)"; exit 1;;
  never) exec sleep 3600;;
  stubborn) trap '' TERM; while true; do sleep 0.2; done;;
esac
exec "${FAKE_VLLM_PYTHON:-python3}" "$(dirname "$0")/fake_vllm.py" --host "$host" --port "$port" --kind "$kind" --name "$name" \
  "${passargs[@]}"
