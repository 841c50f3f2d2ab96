"""Parallelism applied to a plain Llama as separate steps: tensor parallelism, then activation
checkpointing, then pipeline stages. Each step takes the model and what it needs, and logs
what it did. Data parallelism (with ZeRO) is the DeepSpeed engine's, given the topology."""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from foundry.parallel.pipeline import build_pipeline_module
from foundry.parallel.tensor import apply_tensor_parallel
from foundry.parallel.topology import Topology
from foundry.pretrain.config import ParallelConfig
from foundry.pretrain.kernels import cross_entropy
from foundry.pretrain.model import Llama

log = logging.getLogger("foundry")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def apply_activation_checkpointing(model: Llama, mode: str, interval: int) -> list[int]:
    """Mark blocks to recompute in backward: all ("full"), every interval-th ("selective"), or none."""
    if mode == "off":
        return []
    every = 1 if mode == "full" else interval
    chosen = [i for i in range(len(model.model.layers)) if i % every == 0]
    for i in chosen:
        model.model.layers[str(i)].recompute = True
    return chosen


def parallelize(model: Llama, topology: Topology, parallel: ParallelConfig) -> tuple[nn.Module, LossFn]:
    """Return the module to hand to DeepSpeed and the loss function that goes with it."""
    loss_fn: LossFn = cross_entropy
    tp = topology.layout.tp
    if tp > 1:
        loss_fn = apply_tensor_parallel(model, topology.get_tensor_model_parallel_group(), parallel.sequence_parallel)
        log.info("tensor parallel: %d ranks per layer%s, vocab-parallel embedding and loss", tp,
                 " + sequence parallel norms" if parallel.sequence_parallel else "")
    recomputed = apply_activation_checkpointing(
        model, parallel.activation_checkpointing, parallel.activation_checkpointing_interval
    )
    if recomputed:
        log.info("activation checkpointing (%s): blocks %s recompute in backward",
                 parallel.activation_checkpointing, recomputed)
    if topology.layout.pp == 1:
        return model, loss_fn
    seq_split = tp if parallel.sequence_parallel else 1
    module = build_pipeline_module(model, topology.ds_topology, loss_fn, seq_split)
    log.info("pipeline parallel: %d stages, layer boundaries %s (embedding, %d blocks, norm, head)",
             topology.layout.pp, [int(b) for b in module.parts], len(model.model.layers))
    return module, loss_fn
