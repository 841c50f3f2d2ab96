"""What a run reports: one console line and one `metrics.jsonl` record per logged step, with
throughput and MFU measured over the steps since the last report."""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch

from foundry.pretrain.checkpoint import write_atomic
from foundry.pretrain.flops import mfu

log = logging.getLogger("foundry")


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, whole process


class StepLogger:
    def __init__(self, path: Path | None, *, start_step: int, max_steps: int, interval: int, tokens_per_step: int,
                 flops_per_token: float, peak_flops: float | None, devices: int, device: torch.device):
        self.path, self.max_steps, self.interval = path, max_steps, interval  # path None: not rank 0
        self.tokens_per_step, self.flops_per_token, self.peak_flops = tokens_per_step, flops_per_token, peak_flops
        self.devices, self.device = devices, device
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.first: dict[str, Any] | None = None
        self.last: dict[str, Any] | None = None
        if path is not None and path.is_file():
            drop_records_after(path, start_step)

    def step(self, step: int, loss: torch.Tensor, engine: Any, skipped: int = 0,
             last: bool = False) -> dict[str, Any] | None:
        """Count a finished step; report it if it is the first, every interval-th, or the last (of the run, or
        before a stop); `skipped` counts the run's skipped steps so far. Returns the record it reported."""
        self.window_steps += 1
        if not (step % self.interval == 0 or self.first is None or step == self.max_steps or last):
            return None
        elapsed = time.perf_counter() - self.window_start
        tok_s = self.tokens_per_step * self.window_steps / elapsed
        util = mfu(tok_s, self.flops_per_token, self.peak_flops, self.devices)
        norm = engine.get_global_grad_norm()
        record = {
            "step": step, "loss": loss.item(), "lr": engine.get_lr()[0],
            "grad_norm": float(norm) if norm is not None else float("nan"), "tokens_per_s": tok_s, "mfu": util,
            "peak_mem_gib": peak_memory_gib(self.device), "tokens": step * self.tokens_per_step,
            "skipped_steps": skipped,
        }
        log.info(
            "step %d/%d | loss %.4f | lr %.2e | grad norm %.3f | %s tok/s | MFU %s | mem %.2f GiB | ETA %s%s",
            step, self.max_steps, record["loss"], record["lr"], record["grad_norm"], _si(tok_s),
            "n/a" if util is None else f"{util:.1%}", record["peak_mem_gib"],
            duration((self.max_steps - step) * elapsed / self.window_steps),
            f" | skipped {skipped}" if skipped else "",
        )
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        self.first = self.first or record
        self.last = record
        self.window_start, self.window_steps = time.perf_counter(), 0
        return record


def drop_records_after(path: Path, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: their first records describe a future that was
    lost, so they go, and every step keeps exactly one record."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    write_atomic(path, "".join(line + "\n" for line in lines))


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
