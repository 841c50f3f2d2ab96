"""Gather the full, unsharded model from any layout: the plain Llama's state dict on rank 0."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from foundry.parallel.tensor import VOCAB_PARAMS
from foundry.parallel.topology import Topology


def full_state_dict(module: nn.Module, names: dict[int, str], topology: Topology, vocab_size: int,
                    tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """fp32 CPU tensors keyed by the plain model's names, on global rank 0 ({} elsewhere).
    `names` maps id(parameter) to its plain name, taken before pipeline wrapping. Every rank must call."""
    import deepspeed

    tp_group, tp = topology.get_tensor_model_parallel_group(), topology.layout.tp
    local: dict[str, torch.Tensor] = {}
    for p in module.parameters():
        zero3 = hasattr(p, "ds_id")
        with deepspeed.zero.GatheredParameters([p]) if zero3 else nullcontext():
            t = p.detach().float().clone()
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=tp_group)
            t = torch.cat(parts, dim=p.partition_dim)
        name = names[id(p)]
        local[name] = (t[:vocab_size] if name in VOCAB_PARAMS else t).cpu()
    keep = topology.dp_rank == 0 and topology.tp_rank == 0
    stages: list[dict[str, torch.Tensor] | None] = [None] * topology.layout.pp
    dist.all_gather_object(stages, local if keep else {}, group=topology.get_pipeline_model_parallel_group())
    if dist.get_rank() != 0:
        return {}
    full = {k: v for stage in stages for k, v in (stage or {}).items()}
    if tie_embeddings:
        full["lm_head.weight"] = full["model.embed_tokens.weight"]
    return full
