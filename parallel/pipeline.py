"""Pipeline parallelism: the model cut into consecutive stages on DeepSpeed's PipelineModule,
which runs its 1F1B schedule over the micro-batches of a step.

The embedding runs on the first stage, the final norm and the head on the last; the blocks of each
stage are given (parallel/stages.py balances them by training FLOPs, the embedding and the head
counted at what they cost, and the planner assumes the same). Tied embeddings live on both the
first and the last stage and DeepSpeed keeps the two copies equal by summing their gradients.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Sequence

import torch
from torch import nn

from foundry.parallel.tensor import LossFn

log = logging.getLogger("foundry")


class BlockStage(nn.Module):
    """A transformer block taking only the activations, as the pipeline passes one tensor along."""

    def __init__(self, block: nn.Module, rope_cos: torch.Tensor, rope_sin: torch.Tensor, seq_split: int):
        super().__init__()
        self.block = block
        self.seq_split = seq_split  # under sequence parallelism x holds 1/seq_split of the sequence
        self.register_buffer("rope_cos", rope_cos, persistent=False)
        self.register_buffer("rope_sin", rope_sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        S = x.shape[1] * self.seq_split
        return self.block(x, self.rope_cos[:S], self.rope_sin[:S])


class _Reuse(nn.Module):
    """A LayerSpec type that hands back an already-built module (DeepSpeed's tied layers want a spec)."""

    def __new__(cls, module: nn.Module) -> nn.Module:  # type: ignore[misc]
        return module


def build_pipeline_module(model: nn.Module, ds_topology, loss_fn: LossFn, seq_split: int,
                          stages: Sequence[range]) -> nn.Module:
    """`model`, a plain Llama (already tensor-parallel if tp > 1), as a DeepSpeed PipelineModule over
    `ds_topology` whose stage i runs the blocks `stages[i]` (global indices, contiguous, as
    parallel.stages.stage_blocks gives them; the last stage may run only the norm and the head). It
    uses `model.model.{embed_tokens,layers,norm}`, `model.lm_head`, `model.cfg.tie_embeddings`,
    `model.rope_cos`/`rope_sin`, and calls each block as block(x, cos, sin)."""
    from deepspeed.pipe import PipelineModule, TiedLayerSpec

    body = model.model
    blocks = [BlockStage(b, model.rope_cos, model.rope_sin, seq_split) for b in body.layers.values()]
    pp = ds_topology.get_dim("pipe")
    if len(stages) != pp or [i for r in stages for i in r] != list(range(len(blocks))) or not all(stages[:-1]):
        raise ValueError(f"stages {stages} must give blocks 0-{len(blocks) - 1} in order to {pp} stages, "
                         "each but the last at least one")
    # Layer i + 1 of the PipelineModule is block i: stage 0 starts at the embedding, the last ends at the head.
    parts = [0, *(r.start + 1 for r in stages[1:]), len(blocks) + 3]

    class StagedPipelineModule(PipelineModule):
        """A PipelineModule on the layer boundaries `parts`. DeepSpeed's partition_method offers only
        'uniform', 'parameters' and 'type:regex'. PipelineModule.__init__ calls `_partition_layers`,
        whose whole job (besides printing) is to set `parts` and this rank's bounds; the layers are
        built and the tied-layer groups formed afterwards from those. DeepSpeed's own
        DualPipeVModule overrides it too."""

        def _partition_layers(self, method: str = "given") -> None:
            self.parts = parts
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=parts[stage], stop=parts[stage + 1])

    if model.cfg.tie_embeddings:
        lm_head = model.lm_head  # shares its weight with the embedding
        first = TiedLayerSpec("embed", _Reuse, body.embed_tokens, tied_weight_attr="weight")
        last = TiedLayerSpec(
            "embed", _Reuse, body.embed_tokens, tied_weight_attr="weight", forward_fn=lambda _embed, x: lm_head(x)
        )
    else:
        first, last = body.embed_tokens, model.lm_head
    # PipelineModule prints its topology and partition to stdout on every rank: keep it in the debug log.
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        module = StagedPipelineModule(
            layers=[first, *blocks, body.norm, last],
            loss_fn=loss_fn,
            topology=ds_topology,
        )
    log.debug("%s", printed.getvalue())
    return module
