#!/usr/bin/env bash
# Create (or update) the virtual environment .venv with foundry and its test dependencies.
# Without an NVIDIA GPU it installs torch's CPU wheel first, so pip never pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
venv=${FOUNDRY_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  "${pip[@]}" "torch==2.13.0"
fi
"${pip[@]}" -e ".[test]"
echo "setup.sh: $venv ready ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
