"""Held-out evaluation: mean next-token loss and perplexity over a fixed number of tokens of each
validation set, the same whatever the layout.

A validation set is a prepared dataset (`foundry prepare-data --holdout` writes one next to the
training shards). Its first `eval.tokens` tokens, in shard order, are cut into windows of
seq_len + 1 tokens (seq_len targets each); window i goes to data-parallel rank i % dp. Every window
has the same number of targets, so the set's loss is the mean of the windows' mean losses, and each
window is scored alone: no micro-batch or rank boundary changes the result. Evaluation reads its own
data and draws no random numbers, so training after it goes on exactly as without it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from foundry.data.stream import Dataset, read_shard
from foundry.data.tokenizer import DataError
from foundry.parallel.topology import Topology
from foundry.pretrain.kernels import cross_entropy

if TYPE_CHECKING:
    from foundry.pretrain.config import EvalConfig

log = logging.getLogger("foundry")


def set_name(ds: Dataset) -> str:
    """The name a validation set is reported under: its directory's name."""
    return Path(ds.name).name


def check_size(ds: Dataset, seq_len: int, tokens: int) -> int:
    """The tokens read to score `tokens` of `ds`; DataError if it has fewer."""
    need = tokens // seq_len * (seq_len + 1)
    if ds.manifest["total_tokens"] < need:
        raise DataError(f"validation set {ds.name} has {ds.manifest['total_tokens']} tokens; eval.tokens={tokens} "
                        f"needs {need} (windows of data.seq_len + 1): lower eval.tokens or hold out more data")
    return need


def eval_windows(ds: Dataset, seq_len: int, tokens: int) -> torch.Tensor:
    """(tokens // seq_len, seq_len + 1) int64: the set's first windows, in order."""
    need = check_size(ds, seq_len, tokens)
    parts, have = [], 0
    for url in ds.urls:
        for sample in read_shard(url, ds.manifest["tokenizer"]["vocab_size"]):
            parts.append(sample.astype(np.int64))
            have += len(sample)
        if have >= need:
            break
    return torch.from_numpy(np.concatenate(parts)[:need].reshape(-1, seq_len + 1))


class Evaluator:
    """Scores the model on each validation set every `interval` steps (0: never) and at the end of training;
    every rank calls `run` at the same step."""

    def __init__(self, sets: list[Dataset], eval_cfg: EvalConfig, seq_len: int, micro_batch: int, topology: Topology,
                 device: torch.device):
        """`eval_cfg`: the eval section (the tokens scored per set, the interval)."""
        self.topology, self.micro_batch, self.device, self.seq_len = topology, micro_batch, device, seq_len
        self.tokens, self.interval = eval_cfg.tokens, eval_cfg.interval
        layout = topology.layout
        self.sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for ds in sets:
            windows = eval_windows(ds, seq_len, self.tokens)
            # This rank's windows; ranks with one fewer repeat a window at weight 0, so that every rank runs
            # as many forward passes (ZeRO-3 gathers weights in each).
            mine = windows[topology.dp_rank::layout.dp]
            per_rank = -(-len(windows) // layout.dp)
            weights = torch.zeros(per_rank)
            weights[:len(mine)] = 1.0
            mine = torch.cat([mine, windows[:per_rank - len(mine)]])
            self.sets[set_name(ds)] = (mine, weights)
        # The loss is counted once: by the last pipeline stage's first tensor-parallel rank.
        self.counts = topology.pp_rank == layout.pp - 1 and topology.tp_rank == 0

    def due(self, step: int, last: bool) -> bool:
        """Whether to evaluate after step `step` (`last`: the last step of this process, by max_steps or a stop)."""
        return bool(self.sets) and (last or bool(self.interval) and step % self.interval == 0)

    @torch.no_grad()
    def run(self, engine: Any, loss_fn: Any) -> dict[str, dict[str, float]]:
        """{set: {"loss", "ppl", "tokens"}}. loss_fn None: the plain cross-entropy of full logits."""
        results = {}
        for name, (windows, weights) in self.sets.items():
            losses = self._window_losses(engine, loss_fn or cross_entropy, windows)
            total = torch.stack([(losses * weights).sum() if self.counts else torch.zeros(()),
                                 weights.sum() if self.counts else torch.zeros(())]).double().to(self.device)
            dist.all_reduce(total)
            loss = float(total[0] / total[1])
            results[name] = {"loss": loss, "ppl": math.exp(loss), "tokens": int(total[1]) * self.seq_len}
        return results

    def _window_losses(self, engine: Any, loss_fn: Any, windows: torch.Tensor) -> torch.Tensor:
        """Each window's mean loss (on the stage that computes the loss; zeros elsewhere), in window order."""
        inputs, targets = windows[:, :-1].to(self.device), windows[:, 1:].to(self.device)
        if self.topology.layout.pp > 1:
            # One window per micro-batch: shapes differ from training's, so the stages renegotiate them.
            engine.reset_activation_shape()
            outputs = engine.eval_batch(iter(zip(inputs[:, None], targets[:, None])), reduce_output=None,
                                        bcast_loss=False, num_micro_batches=len(windows))
            engine.reset_activation_shape()
            return torch.stack(outputs).float().cpu() if self.counts else torch.zeros(len(windows))
        engine.module.eval()
        losses = []
        for i in range(0, len(windows), self.micro_batch):
            logits = engine(inputs[i:i + self.micro_batch])
            for j in range(logits.shape[0]):
                losses.append(loss_fn(logits[j:j + 1], targets[i + j:i + j + 1]).float().cpu())
        engine.module.train()
        return torch.stack(losses)


def report(step: int, results: dict[str, dict[str, float]], path: Path | None) -> None:
    """One console line, and one `eval.jsonl` record (rank 0: path given)."""
    log.info("eval at step %d | %s", step, " | ".join(
        f"{name}: loss {r['loss']:.4f}, ppl {r['ppl']:.2f} ({r['tokens']} tokens)" for name, r in results.items()))
    if path is not None:
        with path.open("a") as f:
            f.write(json.dumps({"step": step, "sets": results}) + "\n")
