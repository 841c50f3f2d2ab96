"""Megatron-style tensor parallelism, applied to a plain Llama (foundry.pretrain.model) from outside.

Each linear layer's weight is split across the tensor-parallel (tp) group:
- column-parallel (q/k/v, gate/up, the output head): output features split, each rank computes
  its slice of the output from the full input;
- row-parallel (o_proj, down_proj): input features split, each rank's partial products are
  summed with one all-reduce;
- the embedding and the head split the vocabulary; the loss is a vocab-parallel cross-entropy
  that never gathers the full logits.
Attention heads follow their q/k/v rows: each rank runs H/tp query heads. With fewer kv heads
than tp ranks the kv projections are kept whole on every rank (they are small) and each rank
uses the kv head its query heads belong to.

With sequence parallelism (Korthikanti et al. 2022) the activations outside attention and MLP
(norms, residual stream) are split along the sequence as well: the all-reduce after a row-parallel
layer becomes a reduce-scatter, and each norm all-gathers its output once for the column-parallel
layers it feeds (q, k and v share one gathered input, as gate and up do).

The model is sliced while it is still on the meta device (no memory): each new parameter records which part
of the full one it is (`Shard`), and the build then gives each rank the values of its own slices alone
(initialised or read from a checkpoint, see pretrain/build.py). A model with real values can be sliced too,
keeping them. Names of parameters do not change.

The model is transformed by its structure alone, never by its classes (this package imports nothing
from foundry.pretrain): `model.model.layers` ("0".."n-1"), each block's `self_attn.{q,k,v,o}_proj`
(with `num_kv_heads` and `head_dim`), `mlp.{gate,up,down}_proj`, `input_layernorm` and
`post_attention_layernorm`; `model.model.embed_tokens`, `model.model.norm`, `model.lm_head` and
`model.cfg.{vocab_size,tie_embeddings}`. A norm has a `weight` its `forward(x)` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

Group = Any
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Parameters with one row per vocabulary entry: split across tp ranks, the vocabulary padded to a multiple of tp.
VOCAB_PARAMS = ("model.embed_tokens.weight", "lm_head.weight")


# Region collectives (Megatron's names): each is a collective in forward and its adjoint in backward.


def _identity(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_gather_seq(x: torch.Tensor, group: Group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _reduce_scatter_seq(x: torch.Tensor, group: Group) -> torch.Tensor:
    # gloo has no reduce-scatter: all-reduce and keep this rank's chunk (same result, more traffic).
    if dist.get_backend(group) == "nccl":
        parts = [p.contiguous() for p in x.chunk(dist.get_world_size(group), dim=1)]
        out = torch.empty_like(parts[0])
        dist.reduce_scatter(out, parts, group=group)
        return out
    return _all_reduce(x, group).chunk(dist.get_world_size(group), dim=1)[dist.get_rank(group)].contiguous()


Collective = Callable[[torch.Tensor, Group], torch.Tensor]


def _region(name: str, forward: Collective, backward: Collective, doc: str) -> type[torch.autograd.Function]:
    """An autograd function (`name` in the autograd graph, docstring `doc`) running `forward` on the input and
    `backward` on its gradient."""

    class Region(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
            ctx.group = group
            return forward(x, group)

        @staticmethod
        def backward(ctx, grad: torch.Tensor):
            return backward(grad, ctx.group), None

    Region.__name__ = Region.__qualname__ = name
    Region.__doc__ = doc
    return Region


_CopyToRegion = _region("CopyToRegion", _identity, _all_reduce,
                        "The input every rank's slice reads: identity forward, the gradients summed backward.")
_ReduceFromRegion = _region("ReduceFromRegion", _all_reduce, _identity,
                            "Partial products summed over the group forward; identity backward.")
_GatherFromSequenceRegion = _region(
    "GatherFromSequenceRegion", _all_gather_seq, _reduce_scatter_seq,
    "Sequence parallelism: the ranks' slices of the sequence all-gathered forward; the gradient reduce-scattered "
    "backward.")
_ReduceScatterToSequenceRegion = _region(
    "ReduceScatterToSequenceRegion", _reduce_scatter_seq, _all_gather_seq,
    "Sequence parallelism: partial products summed and split along the sequence forward; the gradient all-gathered "
    "backward.")


def copy_to_tensor_model_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _CopyToRegion.apply(x, group)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ReduceFromRegion.apply(x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _GatherFromSequenceRegion.apply(x, group)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ReduceScatterToSequenceRegion.apply(x, group)


def _enter_column(x: torch.Tensor, group: Group, input_gathered: bool) -> torch.Tensor:
    """The full input of a column-parallel layer, with the right collective in backward. `input_gathered`: a
    SequenceParallelNorm before the layer has all-gathered it along the sequence already (and reduce-scatters
    its gradient), so nothing is left to do here."""
    if input_gathered:
        return x
    return copy_to_tensor_model_parallel_region(x, group)


def _leave_row(x: torch.Tensor, group: Group, sequence_parallel: bool) -> torch.Tensor:
    """Sum a row-parallel layer's partial outputs (and split them along the sequence under SP)."""
    if sequence_parallel:
        return reduce_scatter_to_sequence_parallel_region(x, group)
    return reduce_from_tensor_model_parallel_region(x, group)


@dataclass(frozen=True)
class Shard:
    """Which part of a full parameter of shape `full_shape` a rank holds: part `rank` of `parts` equal parts along
    `dim`, the full size first padded with zeros to a multiple of `parts` (only the vocabulary ever needs it).
    `dim=None`: the whole parameter."""

    full_shape: tuple[int, ...]
    dim: int | None = None
    rank: int = 0
    parts: int = 1

    def bounds(self) -> tuple[int, int, int]:
        """(start, stop, size) along `dim`: the real rows or columns [start, stop) and the part's size, which is
        larger where the part reaches into the padding."""
        assert self.dim is not None
        full = self.full_shape[self.dim]
        size = -(-full // self.parts)
        start = min(self.rank * size, full)
        return start, min(start + size, full), size

    def cut(self, full: torch.Tensor) -> torch.Tensor:
        """This part of `full`, a tensor of `full_shape` (real or meta), as a tensor of its own."""
        if self.dim is None:
            return full
        start, stop, size = self.bounds()
        part = full.narrow(self.dim, start, stop - start)
        return self._pad(part, size) if stop - start < size else part.clone()

    def read(self, stored: Any) -> torch.Tensor:
        """This part of a stored tensor that can be sliced without reading the rest (safetensors' `get_slice`)."""
        if self.dim is None:
            return stored[:]
        start, stop, size = self.bounds()
        return self._pad(stored[(slice(None),) * self.dim + (slice(start, stop),)], size)

    def _pad(self, part: torch.Tensor, size: int) -> torch.Tensor:
        missing = size - part.shape[self.dim]
        if not missing:
            return part
        return torch.cat([part, part.new_zeros(*part.shape[:self.dim], missing, *part.shape[self.dim + 1:])], self.dim)

    @property
    def shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.full_shape
        return (*self.full_shape[:self.dim], self.bounds()[2], *self.full_shape[self.dim + 1:])


def shard_of(p: torch.Tensor) -> Shard:
    """The part of its full parameter `p` is: what `_split` recorded, else the whole of it."""
    return getattr(p, "shard", None) or Shard(tuple(p.shape))


def _split(full: torch.Tensor, dim: int, rank: int, tp: int) -> nn.Parameter:
    """This rank's part of `full` as a parameter that records which part it is. DeepSpeed counts parameters
    flagged `tensor_model_parallel` once per tp rank in the global grad norm; unflagged ones are taken as
    replicated and counted on tp rank 0 only."""
    shard = Shard(tuple(full.shape), dim, rank, tp)
    p = nn.Parameter(shard.cut(full.detach()))
    p.tensor_model_parallel = True
    p.partition_dim = dim
    p.shard = shard
    return p


# Layers.


class ColumnParallelLinear(nn.Module):
    """y[..., slice] = x W[slice]^T: this rank's rows of W (output features), bias-free.

    `input_gathered`: x arrives whole from a SequenceParallelNorm, which gathered it along the sequence.
    Set it only there: under sequence parallelism any other input is this rank's 1/tp of the sequence."""

    def __init__(self, weight: nn.Parameter, group: Group, input_gathered: bool = False):
        super().__init__()
        self.weight = weight
        self.group, self.input_gathered = group, input_gathered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_enter_column(x, self.group, self.input_gathered), self.weight)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x[..., slice] W[:, slice]^T: this rank's columns of W (input features), bias-free.
    Under sequence parallelism the sum is reduce-scattered along the sequence."""

    def __init__(self, weight: nn.Parameter, group: Group, sequence_parallel: bool = False):
        super().__init__()
        self.weight = weight
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _leave_row(F.linear(x, self.weight), self.group, self.sequence_parallel)


class ReplicatedKVLinear(nn.Module):
    """A k or v projection kept whole on every rank (fewer kv heads than tp ranks); this rank
    computes only the kv head its query heads use. Each rank's weight gradient covers its own
    head, so the gradients are summed over the group to give every rank the full one."""

    def __init__(self, weight: nn.Parameter, rows: slice, group: Group, input_gathered: bool = False):
        super().__init__()
        self.weight = weight
        self.rows, self.group, self.input_gathered = rows, group, input_gathered  # as ColumnParallelLinear's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = copy_to_tensor_model_parallel_region(self.weight, self.group)
        return F.linear(_enter_column(x, self.group, self.input_gathered), weight[self.rows])


class VocabParallelEmbedding(nn.Module):
    """Embedding rows [start, start + V/tp) on this rank; other ids give zeros, summed over ranks."""

    def __init__(self, weight: nn.Parameter, vocab_start: int, group: Group, sequence_parallel: bool):
        super().__init__()
        self.weight = weight
        self.vocab_start, self.group, self.sequence_parallel = vocab_start, group, sequence_parallel

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return _leave_row(out, self.group, self.sequence_parallel)


class SequenceParallelNorm(nn.Module):
    """A norm over this rank's slice of the sequence, its output all-gathered whole for the column-parallel
    layers it feeds. Its weight gradient is partial on each rank and is summed. It runs the original norm's
    own forward (and so the kernel that norm was built with) on the weight copied into the tensor-parallel
    region, and holds that weight itself, so the parameter keeps its name."""

    def __init__(self, norm: nn.Module, group: Group):
        super().__init__()
        self.weight = norm.weight
        self.group = group
        # Not a submodule, so that its weight is registered once, here, under the name it had. Safe: .to(),
        # .apply() and state_dict() never see `norm`, and its forward runs on the weight passed to
        # functional_call; its own `weight` may stay the meta parameter the model was built with.
        object.__setattr__(self, "norm", norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = copy_to_tensor_model_parallel_region(self.weight, self.group)
        normed = torch.func.functional_call(self.norm, {"weight": weight}, (x,))
        return gather_from_sequence_parallel_region(normed, self.group)


# The loss.


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, vocab_start: int, vocab_size: int, group: Group):
        # logits (N, V/tp) fp32, target (N,). Columns past the real vocabulary are padding: -inf.
        shard = logits.shape[-1]
        ids = torch.arange(vocab_start, vocab_start + shard, device=logits.device)
        logits = logits.masked_fill(ids >= vocab_size, float("-inf"))
        max_logit = logits.max(dim=-1).values
        dist.all_reduce(max_logit, op=dist.ReduceOp.MAX, group=group)
        logits = logits - max_logit.unsqueeze(-1)

        local = target - vocab_start
        outside = (local < 0) | (local >= shard)
        local = local.masked_fill(outside, 0)
        target_logit = logits.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(target_logit, group=group)

        exp = logits.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), local, outside)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax, local, outside = ctx.saved_tensors
        grad_logits = softmax.clone()
        grad_logits.scatter_add_(-1, local.unsqueeze(-1), -(~outside).to(softmax.dtype).unsqueeze(-1))
        return grad_logits * grad.unsqueeze(-1), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, vocab_start: int, vocab_size: int, group: Group
) -> torch.Tensor:
    """Mean cross-entropy of vocab-sharded logits (B, S, V/tp) against targets (B, S)."""
    losses = _VocabParallelCrossEntropy.apply(logits.float().flatten(0, 1), target.flatten(), vocab_start, vocab_size, group)
    return losses.mean()


# Applying it.


# `sp`: sequence parallelism, under which every column-parallel layer reads a SequenceParallelNorm's gathered output.


def _parallelize_attention(attn: nn.Module, group: Group, rank: int, tp: int, sp: bool) -> None:
    attn.q_proj = ColumnParallelLinear(_split(attn.q_proj.weight, 0, rank, tp), group, input_gathered=sp)
    if attn.num_kv_heads >= tp:
        attn.k_proj = ColumnParallelLinear(_split(attn.k_proj.weight, 0, rank, tp), group, input_gathered=sp)
        attn.v_proj = ColumnParallelLinear(_split(attn.v_proj.weight, 0, rank, tp), group, input_gathered=sp)
    else:
        head = rank // (tp // attn.num_kv_heads)  # the kv head of this rank's query heads
        rows = slice(head * attn.head_dim, (head + 1) * attn.head_dim)
        attn.k_proj = ReplicatedKVLinear(attn.k_proj.weight, rows, group, input_gathered=sp)
        attn.v_proj = ReplicatedKVLinear(attn.v_proj.weight, rows, group, input_gathered=sp)
    attn.o_proj = RowParallelLinear(_split(attn.o_proj.weight, 1, rank, tp), group, sp)


def _parallelize_mlp(mlp: nn.Module, group: Group, rank: int, tp: int, sp: bool) -> None:
    mlp.gate_proj = ColumnParallelLinear(_split(mlp.gate_proj.weight, 0, rank, tp), group, input_gathered=sp)
    mlp.up_proj = ColumnParallelLinear(_split(mlp.up_proj.weight, 0, rank, tp), group, input_gathered=sp)
    mlp.down_proj = RowParallelLinear(_split(mlp.down_proj.weight, 1, rank, tp), group, sp)


def apply_tensor_parallel(model: nn.Module, group: Group, sequence_parallel: bool = False) -> LossFn:
    """Swap `model`'s layers for tensor-parallel ones in place; return the matching loss function."""
    rank, tp = dist.get_rank(group), dist.get_world_size(group)
    sp = sequence_parallel
    for block in model.model.layers.values():
        _parallelize_attention(block.self_attn, group, rank, tp, sp)
        _parallelize_mlp(block.mlp, group, rank, tp, sp)
        if sp:
            block.input_layernorm = SequenceParallelNorm(block.input_layernorm, group)
            block.post_attention_layernorm = SequenceParallelNorm(block.post_attention_layernorm, group)
    if sp:
        model.model.norm = SequenceParallelNorm(model.model.norm, group)

    # The vocabulary is padded to a multiple of tp; the loss masks the padded columns.
    vocab_size = model.cfg.vocab_size
    embed = _split(model.model.embed_tokens.weight, 0, rank, tp)
    shard = embed.shape[0]
    model.model.embed_tokens = VocabParallelEmbedding(embed, rank * shard, group, sp)
    head = embed if model.cfg.tie_embeddings else _split(model.lm_head.weight, 0, rank, tp)
    model.lm_head = ColumnParallelLinear(head, group, input_gathered=sp)

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, target, rank * shard, vocab_size, group)

    return loss_fn
