#!/usr/bin/env bash
# The README's main job: tokenize Python's standard library into shards (once), then pretrain the
# tiny preset on them with 2 CPU processes. Run from anywhere after `bash setup.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FOUNDRY_VENV:-.venv}
data=runs/data/stdlib
if [ ! -f "$data/manifest.json" ]; then
  stdlib=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
  # Empty __init__.py files and a few deliberately non-UTF-8 test modules are skipped, and counted.
  "$venv/bin/foundry" prepare-data "$stdlib" --pattern '**/*.py' --exclude 'site-packages/*' \
    --exclude 'dist-packages/*' --vocab-size 512 --shard-tokens 500000 --on-error skip --out "$data"
fi
exec "$venv/bin/foundry" launch local configs/models/tiny.yaml configs/quickstart.yaml "$@"
