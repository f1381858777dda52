#!/usr/bin/env bash
# Create .venv with the gateway installed (idempotent). Used by run.sh and test.sh.
#   EXTRAS=test scripts/setup_gateway.sh   # also the test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "error: $PYTHON must be Python 3.11 or newer" >&2; exit 1
fi
if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -m venv .venv 2>/dev/null; then
    # Debian ships venv separately.
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null; fi
    rm -rf .venv; "$PYTHON" -m venv .venv
  fi
fi
spec="."
[ -n "${EXTRAS:-}" ] && spec=".[${EXTRAS}]"
# The pinned run-time set first (requirements.txt, what `pip install -r requirements.txt` gives a user),
# then the package itself and any extras on top of it.
pip_install() {
  local out
  if ! out=$(.venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1); then
    echo "$out" >&2; echo "error: pip install $* failed" >&2; exit 1
  fi
  printf '%s\n' "$out" | grep -v -e "^WARNING: Location" -e '^$' || true
}
pip_install -r requirements.txt
pip_install -e "$spec"
.venv/bin/python -c 'import er_gateway.app' 
