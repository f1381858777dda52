#!/usr/bin/env bash
# Regenerate requirements.txt: the gateway's run-time dependencies (pyproject.toml) resolved and pinned
# in a throw-away venv. scripts/setup_gateway.sh installs from it, so CI runs on exactly these pins
# and tests/test_packaging.py checks they still satisfy pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${PYTHON:-python3}" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --disable-pip-version-check . 2>&1 | grep -v "^WARNING: Location" || true
{
  echo "# Pinned run-time dependencies of the gateway (pyproject.toml), for: pip install -r requirements.txt"
  echo "# Regenerate with: bash scripts/pin_requirements.sh"
  "$tmp/venv/bin/pip" freeze --exclude er-gateway
} > requirements.txt
echo "wrote requirements.txt ($(grep -vc '^#' requirements.txt) pins)"
