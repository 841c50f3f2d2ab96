"""The training batches of this rank, and the run's position in the data (a checkpoint's "data").

Tensor-parallel peers read the same batches: the data split is by data-parallel rank only. Middle
pipeline stages never ask for a batch, so they read nothing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.distributed as dist

from foundry.data.stream import ShardLoader, merge_states

if TYPE_CHECKING:
    from foundry.pretrain.build import Run
    from foundry.pretrain.config import DataConfig

log = logging.getLogger("foundry")


class Batches:
    """Micro-batches (inputs, targets), each (micro_batch, seq_len), on this rank's device: `run`'s datasets
    read as the `data` section says, in the order `seed` draws."""

    def __init__(self, run: Run, data: DataConfig, seed: int, micro_batch: int):
        self.run, self.data, self.seed, self.micro_batch = run, data, seed, micro_batch
        self.loader = self._loader(None)
        self._batches: Iterator[torch.Tensor] | None = None
        log.info("data: %s | %.1fM tokens | %d streams, %d per rank, %d worker%s",
                 ", ".join(f"{ds.name} x {ds.weight:g}" for ds in run.datasets),
                 sum(ds.manifest["total_tokens"] for ds in run.datasets) / 1e6, data.streams,
                 data.streams // run.layout.dp, data.workers, "" if data.workers == 1 else "s")

    def _loader(self, state: dict[str, Any] | None) -> ShardLoader:
        d, topology = self.data, self.run.topology
        return ShardLoader(self.run.datasets, seq_len=d.seq_len, micro_batch=self.micro_batch, seed=self.seed,
                           streams=d.streams, workers=d.workers, dp_rank=topology.dp_rank, dp_size=topology.layout.dp,
                           shuffle=d.shuffle, on_error=d.on_error, state=state)

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None:
            self._batches = iter(self.loader)  # starts the loader's workers
        batch = next(self._batches)  # (micro_batch, seq_len + 1)
        return batch[:, :-1].to(self.run.device), batch[:, 1:].to(self.run.device)

    def describe(self, step: int) -> str:
        """Where step `step`'s global batch is in the data, for a message that asks to inspect it."""
        tokens = self.run.tokens_per_step
        first, last = (step - 1) * tokens, step * tokens - 1
        return f"global batch {step} of the data order (train.seed={self.seed}), tokens {first}-{last} of the run"

    def state_dict(self) -> dict[str, Any]:
        """The whole run's data position. Collective over data parallelism: each rank holds its own streams."""
        layout = self.run.layout
        states: list[dict | None] = [None] * layout.dp
        dist.all_gather_object(states, self.loader.state_dict(), group=self.run.topology.get_data_parallel_group())
        return merge_states(states)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position (before the first batch)."""
        self.loader = self._loader(state)

    def close(self) -> None:
        """Stop the loader's workers; call it on every way out of training (see ShardLoader.close)."""
        self.loader.close()
