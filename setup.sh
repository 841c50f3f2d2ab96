#!/usr/bin/env bash
# Create (or update) the virtual environment .venv with foundry and its test dependencies.
# Without an NVIDIA GPU it installs torch's CPU wheel first, so pip never pulls a CUDA build.
# --with-services also installs, from Debian packages, what the tests start for real: a SLURM
# controller and node daemon with munge (tests/slurm_cluster.py starts them on localhost), and
# Chromium (tests/test_tracking.py opens the MLflow UI in it).
set -euo pipefail
cd "$(dirname "$0")"
have() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ]; }
if [ "${1:-}" = "--with-services" ]; then
  if ! have slurmctld || ! have slurmd || ! have munged || ! have chromium; then
    sudo=(); [ "$(id -u)" = 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge chromium >/dev/null
  fi
fi
venv=${FOUNDRY_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  "${pip[@]}" "torch==2.13.0"
fi
"${pip[@]}" -e ".[test]"
echo "setup.sh: $venv ready ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
