#!/usr/bin/env bash
# Report the state of both vLLM servers and the gateway; exit 0 only when everything is up.
set -uo pipefail
# shellcheck source-path=SCRIPTDIR source=scripts/vllm_common.sh
source "$(cd "$(dirname "$0")" && pwd)/scripts/vllm_common.sh"

usage() {
  cat <<EOF
Usage: ./check_models_status.sh [--json] [--only embedding|reranker] [--no-gateway] [--help]

Per model: pid alive, port listening, /health, served names and max_model_len (/v1/models),
GPU memory (nvidia-smi, when present), log file and its last error line. Then the gateway's
/health at GATEWAY_URL (now $GATEWAY_URL) unless --no-gateway. /v1/models is asked with the
backend key (VLLM_API_KEY, else \$LOG_DIR/vllm_api_key); /health needs none.
Exit codes: 0 everything checked is up; 1 something is down; 2 bad usage.
EOF
}

JSON=0 ONLY="" GATEWAY=1
while [ $# -gt 0 ]; do
  case "$1" in
    --json) JSON=1; shift;;
    --only) ONLY=${2:-}; shift 2 || { echo "error: --only needs a value" >&2; exit 2; };;
    --no-gateway) GATEWAY=0; shift;;
    -h|--help) usage; exit 0;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2;;
  esac
done
parse_only "$ONLY"

PY=$(command -v python3 || command -v python || true)
json_field() {  # json_field 'expr on d' < json
  [ -n "$PY" ] || { echo "-"; return; }
  "$PY" -c "import json,sys
try:
    d=json.load(sys.stdin); print($1)
except Exception:
    print('-')" 2>/dev/null
}
gpu_mem() {  # MiB used by the process tree of $1, or "-"
  command -v nvidia-smi >/dev/null 2>&1 || { echo "-"; return; }
  local pids total=0 p m
  pids=" $1 $(pgrep -g "$1" 2>/dev/null | tr '\n' ' ') "
  while IFS=, read -r p m; do
    p=${p// /}; m=${m// /}
    case "$pids" in *" $p "*) total=$(( total + ${m%MiB} ));; esac
  done < <(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null)
  echo "${total} MiB"
}
esc() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; s=${s//$'\t'/ }; printf '%s' "$s"; }

all_up=1
rows=()
json_items=()
for kind in $KINDS; do
  pidfile=$(model_get "$kind" pidfile); pid=$(pid_from_file "$pidfile"); port=$(model_get "$kind" port)
  log=$(model_get "$kind" log)
  alive=false; pid_alive "$pid" && alive=true
  listening=false; port_open "$port" && listening=true
  health=$(http_code "http://$PROBE_HOST:$port/health"); [ -z "$health" ] && health=0; health=$((10#$health))
  names="-"; maxlen="-"
  if [ "$health" = 200 ]; then
    models=$(vllm_curl "http://$PROBE_HOST:$port/v1/models")
    names=$(printf '%s' "$models" | json_field "','.join(m['id'] for m in d['data'])")
    maxlen=$(printf '%s' "$models" | json_field "','.join(str(m.get('max_model_len','-')) for m in d['data'])")
  fi
  mem="-"; $alive && mem=$(gpu_mem "$pid")
  lasterr="-"
  [ -f "$log" ] && lasterr=$(grep -aE ' ERROR |CRITICAL|Traceback|[A-Za-z]+(Error|Exception):' "$log" | tail -n1 | cut -c1-160)
  [ -z "$lasterr" ] && lasterr="-"
  up=false; { $alive && [ "$health" = 200 ]; } && up=true
  $up || all_up=0
  rows+=("$kind|${pid:--}|$alive|$port|$listening|$health|$names|$maxlen|$mem|$up|$log|$lasterr")
  json_items+=("\"$kind\": {\"up\": $up, \"pid\": ${pid:-null}, \"pid_alive\": $alive, \"port\": $port, \"listening\": $listening, \"health\": $health, \"served_names\": \"$(esc "$names")\", \"max_model_len\": \"$(esc "$maxlen")\", \"gpu_memory\": \"$(esc "$mem")\", \"log\": \"$(esc "$log")\", \"last_error\": \"$(esc "$lasterr")\"}")
done

gw_json="null"
if [ "$GATEWAY" = 1 ]; then
  gw_code=$(http_code "$GATEWAY_URL/health"); [ -z "$gw_code" ] && gw_code=0; gw_code=$((10#$gw_code))
  gw_status=$(curl -s -m 3 "$GATEWAY_URL/health" 2>/dev/null | json_field "d['status']")
  gw_up=false; [ "$gw_code" = 200 ] && gw_up=true
  $gw_up || all_up=0
  gw_json="{\"url\": \"$(esc "$GATEWAY_URL")\", \"up\": $gw_up, \"http\": $gw_code, \"status\": \"$(esc "${gw_status:--}")\"}"
fi

if [ "$JSON" = 1 ]; then
  ok=false; [ "$all_up" = 1 ] && ok=true
  printf '{"all_up": %s, "models": {%s}, "gateway": %s}\n' "$ok" "$(IFS=,; echo "${json_items[*]}")" "$gw_json"
else
  for r in "${rows[@]}"; do
    IFS='|' read -r kind pid alive port listening health names maxlen mem up log lasterr <<< "$r"
    if [ "$up" = true ]; then state="${C_OK}UP${C_OFF}"; else state="${C_BAD}DOWN${C_OFF}"; fi
    echo "== $kind model: $state"
    printf '   %-16s %s\n' "pid" "$pid ($([ "$alive" = true ] && echo alive || echo not running))" \
      "port" "$port ($([ "$listening" = true ] && echo listening || echo closed))" \
      "/health" "$health" "served names" "$names" "max_model_len" "$maxlen" "GPU memory" "$mem" \
      "log" "$log" "last error" "${C_DIM}${lasterr}${C_OFF}"
  done
  if [ "$GATEWAY" = 1 ]; then
    if [ "$gw_up" = true ]; then state="${C_OK}UP${C_OFF}"; else state="${C_BAD}DOWN${C_OFF}"; fi
    echo "== gateway $GATEWAY_URL: $state (HTTP $gw_code, ${gw_status:--})"
  fi
fi
[ "$all_up" = 1 ]
