#!/usr/bin/env bash
# Stop the vLLM servers started by start_vllm_models.sh, by process group from their pid files.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=scripts/vllm_common.sh
source "$(cd "$(dirname "$0")" && pwd)/scripts/vllm_common.sh"

usage() {
  cat <<EOF
Usage: ./stop_vllm_models.sh [--only embedding|reranker] [--help]

Sends SIGTERM to each model's process group (from \$LOG_DIR/{embedding,reranker}.pid), waits up to
STOP_TIMEOUT (now $STOP_TIMEOUT) seconds, then SIGKILL. Never kills by process name: a vLLM not
started by start_vllm_models.sh is left alone. Stale pid files are removed.

Exit codes: 0 stopped, or was not running; 1 a process survived SIGKILL; 2 bad usage.
EOF
}

ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --only) ONLY=${2:-}; shift 2 || { echo "error: --only needs a value" >&2; exit 2; };;
    --only=*) ONLY=${1#--only=}; shift;;
    -h|--help) usage; exit 0;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2;;
  esac
done
parse_only "$ONLY"

# Alive = a member of the process group that is not a zombie (where no init reaps them,
# e.g. in some containers, kill -0 would still "see" a dead process).
group_alive() { ps -eo pgid=,stat= 2>/dev/null | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {found=1} END {exit !found}'; }
live_pid() { local st; st=$(ps -o stat= -p "$1" 2>/dev/null) && [ -n "$st" ] && [ "${st#Z}" = "$st" ]; }
rc=0
for kind in $KINDS; do
  pidfile=$(model_get "$kind" pidfile); pid=$(pid_from_file "$pidfile")
  if [ -z "$pid" ]; then echo "$kind model: not running (no pid file)"; continue; fi
  if ! live_pid "$pid" && ! group_alive "$pid"; then
    echo "$kind model: not running (removed stale pid file, pid $pid)"; rm -f "$pidfile"; continue
  fi
  printf '%s model: stopping process group %s ' "$kind" "$pid"
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  waited=0
  while group_alive "$pid" || live_pid "$pid"; do
    if [ "$waited" -ge $(( STOP_TIMEOUT * 10 )) ]; then
      printf '(SIGKILL after %ss) ' "$STOP_TIMEOUT"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
      sleep 1
      break
    fi
    sleep 0.1; waited=$(( waited + 1 ))
  done
  if group_alive "$pid" || live_pid "$pid"; then
    echo "FAILED: still running"; rc=1
  else
    echo "stopped"; rm -f "$pidfile"
  fi
done
exit "$rc"
