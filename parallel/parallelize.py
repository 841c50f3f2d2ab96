"""Parallelism applied to a plain Llama as separate steps: tensor parallelism, then pipeline stages.
Each step takes the model and what it needs, and logs what it did. Data parallelism (with ZeRO) is
the DeepSpeed engine's, given the topology; activation checkpointing is a model option
(foundry.pretrain.model.ModelOptions), fixed when the model is built."""

from __future__ import annotations

import logging

from torch import nn

from foundry.parallel.pipeline import build_pipeline_module
from foundry.parallel.tensor import LossFn, apply_tensor_parallel
from foundry.parallel.topology import Topology

log = logging.getLogger("foundry")


def parallelize(model: nn.Module, topology: Topology, loss_fn: LossFn,
                sequence_parallel: bool) -> tuple[nn.Module, LossFn]:
    """The module to hand to DeepSpeed, and the loss function that goes with it. `model` is a plain Llama
    (foundry.pretrain.model) and `loss_fn` its plain loss of (logits, targets)."""
    tp = topology.layout.tp
    if tp > 1:
        loss_fn = apply_tensor_parallel(model, topology.get_tensor_model_parallel_group(), sequence_parallel)
        log.info("tensor parallel: %d ranks per layer%s, vocab-parallel embedding and loss", tp,
                 " + sequence parallel norms" if sequence_parallel else "")
    if topology.layout.pp == 1:
        return model, loss_fn
    seq_split = tp if sequence_parallel else 1
    module = build_pipeline_module(model, topology.ds_topology, loss_fn, seq_split)
    log.info("pipeline parallel: %d stages, layer boundaries %s (embedding, %d blocks, norm, head)",
             topology.layout.pp, [int(b) for b in module.parts], len(model.model.layers))
    return module, loss_fn
