"""Parallelism applied to a plain Llama as separate steps: tensor parallelism, then pipeline stages.
Each step takes the model and what it needs, and logs what it did. Data parallelism (with ZeRO) is
the DeepSpeed engine's, given the topology; activation checkpointing is a model option
(foundry.pretrain.model.ModelOptions), fixed when the model is built.

The steps run on a model built on the meta device, before it has any memory: tensor parallelism slices
its shapes, the pipeline stage picks which of its parameters this rank keeps, and only those are then
given memory and values (`materialize`), so no rank ever holds the whole model."""

from __future__ import annotations

import logging
from typing import Callable

from torch import nn

from foundry.parallel.pipeline import build_pipeline_module
from foundry.parallel.planner import ModelShape
from foundry.parallel.stages import stage_blocks
from foundry.parallel.tensor import LossFn, apply_tensor_parallel
from foundry.parallel.topology import Topology

log = logging.getLogger("foundry")


Keep = Callable[[str], bool]  # of a parameter's name in the plain model: does this rank hold it?


def parallelize(model: nn.Module, topology: Topology, loss_fn: LossFn, sequence_parallel: bool, seq_len: int,
                materialize: Callable[[Keep], None]) -> tuple[nn.Module, LossFn]:
    """The module to hand to DeepSpeed, and the loss function that goes with it. `model` is a plain Llama
    (foundry.pretrain.model), on the meta device or not, and `loss_fn` its plain loss of (logits, targets).
    `materialize(keep)` is called once the model is sliced, before the pipeline module needs memory, to give
    the parameters `keep` names memory and values (pretrain/build.py; a no-op for a model that has values).
    Pipeline stages are balanced by training FLOPs at `seq_len`, the training sequence length, as the planner
    balances them."""
    tp = topology.layout.tp
    if tp > 1:
        loss_fn = apply_tensor_parallel(model, topology.get_tensor_model_parallel_group(), sequence_parallel)
        log.info("tensor parallel: %d ranks per layer%s, vocab-parallel embedding and loss", tp,
                 " + sequence parallel norms" if sequence_parallel else "")
    if topology.layout.pp == 1:
        materialize(lambda name: True)
        return model, loss_fn
    seq_split = tp if sequence_parallel else 1
    stages = stage_blocks(ModelShape.of(model.cfg), topology.layout.pp, seq_len)
    stage = topology.get_pipeline_model_parallel_rank()
    materialize(stage_keeps(stages[stage], first=stage == 0, last=stage == len(stages) - 1,
                            tied=model.cfg.tie_embeddings))
    module = build_pipeline_module(model, topology.ds_topology, loss_fn, seq_split, stages)
    log.info("pipeline parallel: %d stages, blocks %s (embedding on the first, norm and head on the last; "
             "balanced by training FLOPs at seq %d)", topology.layout.pp, " | ".join(map(_blocks, stages)), seq_len)
    return module, loss_fn


def stage_keeps(blocks: range, first: bool, last: bool, tied: bool) -> Keep:
    """Which parameters a pipeline stage holds: its blocks', the embedding on the first stage, the final norm and
    the head on the last (where a tied head is the embedding, which the last stage then holds too)."""

    def keep(name: str) -> bool:
        if name.startswith("model.layers."):
            return int(name.split(".")[2]) in blocks
        if name.startswith("model.embed_tokens."):
            return first or (last and tied)
        return last  # model.norm, lm_head

    return keep


def _blocks(r: range) -> str:
    """A stage's blocks for the log: "4-8", "4", or "none" (a last stage of only the norm and head)."""
    return f"{r.start}-{r[-1]}" if len(r) > 1 else str(r.start) if r else "none"
