"""`python -m tests.pause_mid_save train ARGS` (or under torchrun: `-m tests.pause_mid_save train ARGS`): `foundry
train` that stops dead at a chosen point of the checkpoint save of step FOUNDRY_PAUSE_SAVE_STEP, and says so on
stdout with its pid and rank. A test can then kill it (or one of its ranks) there every time, without racing it.
The production code runs unchanged: only the functions named below are wrapped.

FOUNDRY_PAUSE_AT, the point (a comma-separated list pauses at each, in the save's order):
  write    the state is copied to host memory, the background thread has not written a file (BackgroundSave._write)
  file     the save's first file is on disk (torch.save, which writes every checkpoint file); the default
  seal     every file of this rank is written and fsynced, the ranks have not yet agreed (BackgroundSave._seal)
  mark     every rank's files are durable, rank 0 has not written COMPLETE.json (BackgroundSave._mark: rank 0 only)
  pointer  COMPLETE.json is written, the pointer `latest_complete` not yet replaced (rank 0 only)
FOUNDRY_PAUSE_SAVE_STEP may list several steps too (comma-separated). FOUNDRY_PAUSE_RANK=R: only rank R pauses (the
others go on until they wait for it); every rank by default. Only the background thread of the save stops: the
training thread goes on to the next save, which waits for this one. FOUNDRY_PAUSE_RELEASE=PATH: each pause lasts
until the file PATH appears (it is removed, for the next pause), rather than until the process is killed.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from foundry.launch.cli import main
from foundry.pretrain import checkpoint
from foundry.pretrain.checkpoint import POINTER, BackgroundSave, tag_for

PAUSED = "paused part-way through the checkpoint save of step"
POINTS = ("write", "file", "seal", "mark", "pointer")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _pause(step: int, point: str, what: str = "") -> None:
    print(f"{PAUSED} {step} at {point}: pid {os.getpid()} rank {_rank()}{what}", flush=True)
    release = os.environ.get("FOUNDRY_PAUSE_RELEASE")
    if release is None:
        threading.Event().wait()  # until the test kills the process
    while True:
        try:
            os.unlink(release)
            return
        except FileNotFoundError:
            time.sleep(0.05)


def _pause_in_saves(steps: set[int], points: set[str], rank: int | None) -> None:
    def wanted(step: int, point: str) -> bool:
        return step in steps and point in points and (rank is None or _rank() == rank)

    def before(name: str) -> None:
        plain = getattr(BackgroundSave, name)

        def wrapped(self, *args, **kwargs):
            if wanted(self.step, name.removeprefix("_")):
                _pause(self.step, name.removeprefix("_"))
            return plain(self, *args, **kwargs)

        setattr(BackgroundSave, name, wrapped)

    for name in ("_write", "_seal", "_mark"):
        before(name)

    plain_save, tags, first = torch.save, {tag_for(step): step for step in steps}, set()

    def save(obj, f, *args, **kwargs):
        plain_save(obj, f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)) and Path(f).parent.name in tags and Path(f).parent.name not in first:
            first.add(Path(f).parent.name)
            if wanted(tags[Path(f).parent.name], "file"):
                _pause(tags[Path(f).parent.name], "file", f": wrote {f}")

    torch.save = save

    plain_write_atomic = checkpoint.write_atomic  # _mark looks it up in the module when it runs

    def write_atomic(path: Path, text: str) -> None:
        in_save = threading.current_thread().name.startswith("foundry-save-")  # not a resume's fallback
        if in_save and path.name == POINTER and text in tags and wanted(tags[text], "pointer"):
            _pause(tags[text], "pointer")
        plain_write_atomic(path, text)

    checkpoint.write_atomic = write_atomic


if __name__ == "__main__":
    points = set(os.environ.get("FOUNDRY_PAUSE_AT", "file").split(","))
    assert points <= set(POINTS), f"FOUNDRY_PAUSE_AT={os.environ['FOUNDRY_PAUSE_AT']}: the points are {POINTS}"
    rank = os.environ.get("FOUNDRY_PAUSE_RANK")
    _pause_in_saves({int(s) for s in os.environ["FOUNDRY_PAUSE_SAVE_STEP"].split(",")}, points,
                    None if rank is None else int(rank))
    sys.exit(main(sys.argv[1:]))
