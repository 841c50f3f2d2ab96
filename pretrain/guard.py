"""Bad steps: a step whose loss is not finite, or spikes, is skipped (no update), and too many in a row
stop the run.

No hook into DeepSpeed and no extra synchronisation is needed. Every DeepSpeed optimizer (ZeRO 1-3,
bf16) already skips a step whose gradient norm is not finite: no update, no LR-schedule step, the
gradients cleared, and `engine.was_step_applied()` False, the same on every rank because it
all-reduces the verdict. So the guard only has to turn a bad micro-batch loss into NaN before
backward (`check`): its NaN gradients reach every rank through the gradient all-reduce, the
tensor-parallel collectives and the pipeline's sends. ZeRO-0 in fp32 steps the plain torch optimizer,
which has no such check: `StepGuard.attach_to` patches one in, and under pipeline parallelism wraps the
last stage's loss function in `check`. After each step, `record` counts what happened.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from foundry.pretrain.config import TrainConfig

log = logging.getLogger("foundry")


class TooManyBadSteps(RuntimeError):
    """The run skipped `max_skipped_in_row` steps in a row; it saved and stopped."""


class StepGuard:
    """Skips bad steps and counts them; its state (recent losses, skipped steps) is checkpointed."""

    def __init__(self, spike_factor: float, window: int, max_in_row: int):
        self.spike_factor, self.max_in_row = spike_factor, max_in_row
        self.recent: deque[float] = deque(maxlen=window)  # losses of applied steps
        self.skipped = 0  # over the whole run
        self.in_row = 0

    @classmethod
    def attach_to(cls, engine: Any, train: TrainConfig, pipeline: bool) -> StepGuard:
        """A guard under the `train` section's limits, attached to `engine`: patches a plain torch optimizer's
        step (`skip_non_finite_steps`) and, with `pipeline`, the pipeline module's loss function."""
        guard = cls(train.spike_factor, train.spike_window, train.max_skipped_in_row)
        skip_non_finite_steps(engine)
        if pipeline:  # the last stage computes the loss of each micro-batch itself
            engine.module.loss_fn = _Checked(engine.module.loss_fn, guard)
        return guard

    def limit(self) -> float:
        """The largest micro-batch loss that may be applied now."""
        if not self.spike_factor or len(self.recent) < self.recent.maxlen:
            return float("inf")
        return self.spike_factor * sum(self.recent) / len(self.recent)

    def check(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss`, or NaN with NaN gradients when it must not be applied. Stays on the device: no sync."""
        if not loss.requires_grad:  # evaluation: nothing to apply
            return loss
        bad = ~torch.isfinite(loss) | (loss > self.limit())
        return loss * torch.where(bad, float("nan"), 1.0)

    def record(self, step: int, loss: float, applied: bool, data_position: str) -> None:
        """Count step `step` (mean loss `loss`); raises TooManyBadSteps once too many in a row were skipped."""
        if applied:
            self.recent.append(loss)
            self.in_row = 0
            return
        self.skipped += 1
        self.in_row += 1
        limit = self.limit()
        # Every rank knows; one says it on the console.
        log.log(logging.WARNING if dist.get_rank() == 0 else logging.INFO,
                "skipped step %d (no update): mean loss %.4g; a micro-batch loss or the gradient norm was not finite%s "
                "| %d in a row, %d in this run | batch: %s", step, loss,
                f", or a loss was above the spike limit {limit:.4g}" if limit < float("inf") else "",
                self.in_row, self.skipped, data_position)
        if self.in_row >= self.max_in_row:
            raise TooManyBadSteps(
                f"{self.in_row} steps in a row were skipped (the last, step {step}, had loss {loss:.4g}): the model "
                f"or the data is broken; inspect the batches logged above, then resume from the checkpoint just "
                f"saved (perhaps with a lower train.lr), or raise train.max_skipped_in_row"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "skipped": self.skipped, "in_row": self.in_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = deque(state["recent"], maxlen=self.recent.maxlen)
        self.skipped, self.in_row = state["skipped"], state["in_row"]


class _Checked:
    """A loss function whose losses pass the guard's check."""

    def __init__(self, loss_fn: Callable[..., torch.Tensor], guard: StepGuard):
        self.loss_fn, self.guard = loss_fn, guard

    def __call__(self, *args: Any) -> torch.Tensor:
        return self.guard.check(self.loss_fn(*args))


def skip_non_finite_steps(engine: Any) -> None:
    """Give a plain torch optimizer (ZeRO-0, fp32) the non-finite-gradient skip DeepSpeed's own ones have.
    DeepSpeed reads `optimizer.overflow` after the step: set, it counts the step as skipped and leaves the
    LR schedule where it was."""
    optimizer = engine.optimizer
    if not hasattr(optimizer, "overflow"):
        optimizer.step = _FiniteStep(optimizer, optimizer.step)


class _FiniteStep:
    """An optimizer's step that is skipped, with `optimizer.overflow` set, when a gradient is not finite."""

    def __init__(self, optimizer: Any, step: Callable[..., Any]):
        self.optimizer, self.step = optimizer, step

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        optimizer = self.optimizer
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = torch.stack([g.isfinite().all() for g in grads]).all().float() if grads else torch.ones(())
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # tensor-parallel shards: one verdict for all
        optimizer.overflow = not bool(finite)
        return None if optimizer.overflow else self.step(*args, **kwargs)
