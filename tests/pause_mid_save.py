"""`python -m tests.pause_mid_save train ARGS`: `foundry train` that stops dead part-way through the checkpoint
save of step FOUNDRY_PAUSE_SAVE_STEP, once the save's first file is on disk, and says so on stdout. A test
can then kill it inside a save every time, without racing it. The production code runs unchanged: only
torch.save, which writes every checkpoint file, is wrapped."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import torch

from foundry.launch.cli import main
from foundry.pretrain.checkpoint import tag_for

PAUSED = "paused part-way through the checkpoint save of step"


def _pause_in_save_of(step: int) -> None:
    plain_save, tag = torch.save, tag_for(step)

    def save(obj, f, *args, **kwargs):
        plain_save(obj, f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)) and Path(f).parent.name == tag:
            print(f"{PAUSED} {step}: wrote {f}", flush=True)
            threading.Event().wait()  # until the test kills the process

    torch.save = save


if __name__ == "__main__":
    _pause_in_save_of(int(os.environ["FOUNDRY_PAUSE_SAVE_STEP"]))
    sys.exit(main(sys.argv[1:]))
