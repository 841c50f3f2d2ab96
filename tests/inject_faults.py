"""`python -m tests.inject_faults train ARGS`: `foundry train` with faults injected, for fault-injection tests.

FOUNDRY_NAN_RANK=R and FOUNDRY_NAN_STEPS=A-B (or A): on rank R, for the first micro-batch of each step from
A to B, the first transformer block's output is NaN, as a bad batch or a broken kernel would make it.
With FOUNDRY_FAULT_SCALE=X, the output layer's logits are multiplied by X instead: a finite loss spike.
Batches are counted as the data loader hands them out, so the production code runs unchanged.
"""

from __future__ import annotations

import os
import sys

from torch import nn

from foundry.data.stream import ShardLoader
from foundry.launch.cli import main
from foundry.pretrain.config import load_config
from foundry.pretrain.model import TransformerBlock

_armed = [False]  # the next poisonable output is poisoned


def _install(first: int, last: int, grad_accum: int, vocab_size: int) -> None:
    plain_iter = ShardLoader.__iter__

    def counted_iter(self):
        for n, batch in enumerate(plain_iter(self)):
            _armed[0] = n % grad_accum == 0 and first <= n // grad_accum + 1 <= last
            yield batch

    ShardLoader.__iter__ = counted_iter
    scale = os.environ.get("FOUNDRY_FAULT_SCALE")
    cls = nn.Linear if scale else TransformerBlock
    plain_forward = cls.forward

    def forward(self, x, *args, **kwargs):
        out = plain_forward(self, x, *args, **kwargs)
        if _armed[0] and (not scale or self.out_features == vocab_size):
            _armed[0] = False
            out = out * float(scale or "nan")
        return out

    cls.forward = forward


if __name__ == "__main__":
    if int(os.environ["RANK"]) == int(os.environ["FOUNDRY_NAN_RANK"]):
        steps = os.environ["FOUNDRY_NAN_STEPS"].split("-")
        cfg = load_config([a for a in sys.argv[2:] if "=" not in a], [a for a in sys.argv[2:] if "=" in a])
        dp = int(os.environ["WORLD_SIZE"]) // (cfg.parallel.tensor * cfg.parallel.pipeline)
        _install(int(steps[0]), int(steps[-1]), cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp),
                 cfg.model.vocab_size)
    sys.exit(main(sys.argv[1:]))
