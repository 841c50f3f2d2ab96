"""Starting training jobs: `torchrun.py` on machines you hold, `slurm.py` as batch jobs, `status.py` to follow them."""

from __future__ import annotations

import json
import time
from pathlib import Path

from foundry.pretrain.checkpoint import write_atomic

JOB_FILE = "launch.json"  # which job trains a run directory: written at launch, read by `foundry launch status`


def record_job(run_dir: Path, **fields: object) -> None:
    write_atomic(run_dir / JOB_FILE, json.dumps({**fields, "launched": time.time()}) + "\n")
