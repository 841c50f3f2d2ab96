"""`python -m tests.slow_save train ARGS`: `foundry train` whose saves and evaluations take longer, for the hang
watchdog's tests. FOUNDRY_SLOW_SAVE_SECONDS=S: on each rank, the first file of each checkpoint takes S seconds
more to write (so a save takes about S more on every rank, however many files it has).
FOUNDRY_SLOW_EVAL_SECONDS=S: each evaluation takes S seconds more. The production code runs unchanged: only
torch.save, which writes every checkpoint file, and Evaluator.run are wrapped."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import torch

from foundry.launch.cli import main
from foundry.pretrain.evaluate import Evaluator


def _slow_saves(seconds: float) -> None:
    plain_save, slowed = torch.save, set()

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            # The checkpoint's directory, whatever a writer appends to its name while it writes.
            tag = next((m.group() for m in map(re.compile(r"step\d{8}").match, Path(f).parts) if m), None)
            if tag is not None and tag not in slowed:
                slowed.add(tag)
                time.sleep(seconds)
        plain_save(obj, f, *args, **kwargs)

    torch.save = save


def _slow_evaluations(seconds: float) -> None:
    plain_run = Evaluator.run

    def run(self, *args, **kwargs):
        time.sleep(seconds)
        return plain_run(self, *args, **kwargs)

    Evaluator.run = run


if __name__ == "__main__":
    if "FOUNDRY_SLOW_SAVE_SECONDS" in os.environ:
        _slow_saves(float(os.environ["FOUNDRY_SLOW_SAVE_SECONDS"]))
    if "FOUNDRY_SLOW_EVAL_SECONDS" in os.environ:
        _slow_evaluations(float(os.environ["FOUNDRY_SLOW_EVAL_SECONDS"]))
    sys.exit(main(sys.argv[1:]))
