"""Which job trains a run directory: written at launch, read by `foundry launch status`."""

from __future__ import annotations

import json
import time
from pathlib import Path

from foundry.pretrain.checkpoint import write_atomic

JOB_FILE = "launch.json"


def record_job(run_dir: Path, **fields: object) -> None:
    write_atomic(run_dir / JOB_FILE, json.dumps({**fields, "launched": time.time()}) + "\n")
