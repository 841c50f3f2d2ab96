"""`foundry launch status RUN_DIR`: the job behind a run directory, its state, and how far training got."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from foundry.launch.record import JOB_FILE
from foundry.launch.slurm import job_state
from foundry.pretrain.checkpoint import find_latest
from foundry.pretrain.stop import read_status


def describe(run_dir: Path) -> list[str]:
    """A few `label  value` lines; raises FileNotFoundError when nothing was ever launched or trained there."""
    job = json.loads((run_dir / JOB_FILE).read_text()) if (run_dir / JOB_FILE).is_file() else None
    status = read_status(run_dir)
    if job is None and status is None:
        raise FileNotFoundError(f"{run_dir} holds no launched or trained run: pass the run's train.run_dir")
    lines = [f"run         {run_dir}"]
    if job and job["scheduler"] == "slurm":
        state = job_state(job["job_id"])
        lines.append(f"job         SLURM {job['job_id']}: " + (
            "no longer known to SLURM" if state is None else
            f"{state['JobState']} ({state['Reason']}), run time {state['RunTime']}, nodes {state['NodeList']}, "
            f"requeued {state['Restarts']} times; log {state['StdOut']}"))
    elif job:
        alive = _alive(job["pid"]) and job["host"] == os.uname().nodename
        lines.append(f"job         local launcher pid {job['pid']} on {job['host']}: "
                     + ("running" if alive else "not running"))
    if status:
        lines.append(f"training    {status['state']} at step {status['step']} of {status['max_steps']}"
                     + (f" (by {status['signal']})" if status.get("signal") else "")
                     + f", {_ago(status['time'])}")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        last = json.loads(metrics.read_text().splitlines()[-1])
        lines.append(f"last log    step {last['step']}: loss {last['loss']:.4f}, {last['tokens_per_s']:.0f} tokens/s, "
                     f"{_ago(metrics.stat().st_mtime)}")
    tag = find_latest(run_dir / "checkpoints")
    lines.append(f"checkpoint  {run_dir / 'checkpoints' / tag if tag else 'none yet'}")
    return lines


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ago(t: float) -> str:
    seconds = max(0, int(time.time() - t))
    return f"{seconds} s ago" if seconds < 120 else f"{seconds // 60} min ago"
