"""How a run stops: signals that ask for a clean stop, and `run_dir/status.json` saying how it ended.

SIGTERM (SLURM pre-emption, `kill`, torchrun passing one on), SIGINT (Ctrl-C) and SIGUSR1 (the
warning SLURM sends before the time limit, see launch/slurm.py) all mean the same: finish the
step in flight, save a checkpoint, exit 0. A signal may reach the ranks during different steps,
so at the end of every step they agree with one all-reduce (max), and all stop after the same
step. Repeats are ignored: SLURM signals every process of a step and torchrun passes the same
signal on, so a worker often gets it twice. A stuck step is torchrun's to kill, after
`launch.grace_seconds`.

Rank 0 keeps `status.json` (state running / finished / stopped / failed, the step, the signal or
the reason) so that the launchers can tell a finished run from a stopped one (requeue it), from one
that failed for a reason a relaunch would meet again (too many bad steps, a save that failed: do
not relaunch) and from a crash (the file still says running: relaunch it).
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from foundry.pretrain.checkpoint import write_atomic

log = logging.getLogger("foundry")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
STATUS = "status.json"


class StopRequest:
    """Catches the stop signals in this process; `agreed()` tells every rank whether any rank got one."""

    def __init__(self) -> None:
        self.signum = 0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.signum:
            log.warning("got %s: stopping after this step, with a checkpoint", signal.Signals(signum).name)
            self.signum = signum

    def agreed(self, device: torch.device) -> str | None:
        """The name of the signal some rank got (collective: every rank calls it once per step)."""
        flag = torch.tensor([self.signum], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return signal.Signals(int(flag.item())).name if flag.item() else None


def write_status(run_dir: Path, state: str, step: int, max_steps: int, signal_name: str | None = None,
                 reason: str | None = None) -> None:
    """Atomically replace run_dir/status.json (rank 0 only)."""
    record = {"state": state, "step": step, "max_steps": max_steps, "signal": signal_name, "reason": reason,
              "time": time.time()}
    write_atomic(run_dir / STATUS, json.dumps(record) + "\n")


def read_status(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / STATUS
    return json.loads(path.read_text()) if path.is_file() else None
