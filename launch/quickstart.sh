#!/usr/bin/env bash
# The README's main job: tokenize Python's standard library into shards (once), then pretrain the
# tiny preset on them with 2 CPU processes. Run from anywhere after `bash setup.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FOUNDRY_VENV:-.venv}
data=runs/data/stdlib
if [ ! -f "$data/holdout/manifest.json" ]; then
  stdlib=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
  # Empty __init__.py files and a few deliberately non-UTF-8 test modules are skipped, and counted.
  "$venv/bin/foundry" prepare-data "$stdlib" --pattern '**/*.py' --exclude 'site-packages/*' \
    --exclude 'dist-packages/*' --vocab-size 512 --shard-tokens 500000 --on-error skip --holdout 0.05 --out "$data"
fi
"$venv/bin/foundry" launch local configs/models/tiny.yaml configs/quickstart.yaml "$@"
# What the model writes now (greedy, then sampled), from the checkpoint the run just saved.
"$venv/bin/foundry" generate runs/quickstart --prompt 'def ' --prompt 'import ' --max-new-tokens 40
"$venv/bin/foundry" generate runs/quickstart --prompt 'def ' --max-new-tokens 40 --temperature 0.8 --top-p 0.95
