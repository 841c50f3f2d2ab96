"""The degrees of parallelism, tensor (tp) x pipeline (pp) x data (dp), and what makes a set of them
valid for a model: plain arithmetic, checked before any process group exists (and by the planner for
every layout it considers). No torch here, so the config and the CLI can import it cheaply.

The model and the parallel settings are read duck-typed, so this package needs nothing from
`foundry.pretrain`: a model section has `num_heads`, `num_kv_heads`, `ffn_hidden_size` and
`num_layers` (pretrain's ModelConfig); a parallel section has `tensor`, `pipeline`, `zero_stage` and
`sequence_parallel` (pretrain's ParallelConfig).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class LayoutError(ValueError):
    """A layout that cannot run; the message is one line naming the setting and the fix. The CLI
    reports it as a config error."""


def divisors(n: int) -> list[int]:
    """Positive divisors of n, ascending: the valid choices offered in error messages."""
    return [d for d in range(1, n + 1) if n % d == 0]


def recompute_every(checkpointing: str, interval: int) -> int:
    """Which blocks recompute their activations in backward under `parallel.activation_checkpointing`:
    every n-th (blocks 0, n, 2n, ...); 0 for none. `interval` is the n of "selective"."""
    return {"off": 0, "full": 1, "selective": interval}[checkpointing]


@dataclass(frozen=True)
class Layout:
    """The degrees of parallelism. Create it with `from_config`, which checks it against the world size
    and the model; `Layout()` is one process."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @staticmethod
    def from_config(parallel: Any, model: Any, world_size: int) -> Layout:
        """The layout of `world_size` processes under the `parallel` section (fields in the module docstring)."""
        tp, pp = parallel.tensor, parallel.pipeline
        if tp < 1 or pp < 1:
            raise LayoutError(f"parallel.tensor={tp} and parallel.pipeline={pp} must be >= 1")
        if world_size % (tp * pp):
            ok = [(t, p) for t in divisors(world_size) for p in divisors(world_size // t)][:6]
            raise LayoutError(
                f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline = {tp} x {pp}: "
                f"use (tensor, pipeline) among {ok} or launch a multiple of {tp * pp} processes"
            )
        layout = Layout(tp=tp, pp=pp, dp=world_size // (tp * pp))
        layout.check(model, parallel.zero_stage, parallel.sequence_parallel)
        return layout

    def check(self, model: Any, zero_stage: int, sequence_parallel: bool) -> None:
        """Raise LayoutError unless `model` splits this way and DeepSpeed runs `zero_stage` with it."""
        tp, pp = self.tp, self.pp
        if model.num_heads % tp:
            raise LayoutError(
                f"model.num_heads={model.num_heads} is not divisible by parallel.tensor={tp}: "
                f"use parallel.tensor among {[t for t in divisors(model.num_heads) if self.world_size % t == 0]}"
            )
        if model.num_kv_heads % tp and tp % model.num_kv_heads:
            raise LayoutError(
                f"model.num_kv_heads={model.num_kv_heads} and parallel.tensor={tp}: one must divide the other "
                f"(kv heads are split when more than tp, replicated when fewer)"
            )
        if model.ffn_hidden_size % tp:
            raise LayoutError(f"model.ffn_hidden_size={model.ffn_hidden_size} is not divisible by parallel.tensor={tp}")
        if pp > model.num_layers:
            raise LayoutError(
                f"parallel.pipeline={pp} exceeds model.num_layers={model.num_layers}: "
                f"use at most {model.num_layers} stages"
            )
        if pp > 1 and zero_stage > 1:
            raise LayoutError(
                f"parallel.zero_stage={zero_stage} with parallel.pipeline={pp}: DeepSpeed's pipeline engine "
                f"supports ZeRO 0 and 1 only; use parallel.zero_stage=1"
            )
        if sequence_parallel and tp == 1:
            raise LayoutError("parallel.sequence_parallel=true needs parallel.tensor > 1: turn it off or raise tensor")

    def __str__(self) -> str:
        return f"tp {self.tp} x pp {self.pp} x dp {self.dp}"
