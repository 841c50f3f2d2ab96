"""Which transformer blocks each pipeline stage runs: one assignment, used by the pipeline
(parallel/pipeline.py) and by the planner (parallel/planner.py), balanced by training compute.

The cost model is pretrain/flops.py's count of training FLOPs per token, which takes its terms
from here (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B): 6 FLOPs per weight that
multiplies (forward 2, backward 4), plus attention's scores and weighted sum. Per token:

    a block        6 x (q, k, v, o, gate, up, down and the two norm gains)
                   + 12 x heads x head_dim x seq_len                                 `block_flops`
    the embedding  0: a lookup, whose backward adds one row per token               `EMBEDDING_FLOPS`
    the head       6 x hidden x vocab for the output layer (2hV forward, x3 with
                   backward), + 6 x hidden for the final norm's gain, as flops.py
                   counts every weight; the loss's softmax is O(vocab), 1/hidden of
                   the output layer, and is left out                                `head_flops`

A stage costs its blocks, plus the embedding on the first stage and the head on the last. Llama 3's
128k vocabulary makes the head cost 1 to 4 blocks (llama3.2-1b: 2.8 at seq 8192, llama3-70b: 1.1):
DeepSpeed's `partition_method="parameters"` weighs the embedding as heavily as the head (it has as
many parameters) and gave llama3.2-1b at pp 4 the blocks [2, 6, 6, 2]; an even split ignores both.
Megatron-LM splits the layers evenly, optionally counting the embedding and the loss as one whole
transformer layer each (`--account-for-embedding-in-pipeline-split`,
`--account-for-loss-in-pipeline-split`); here each is weighed by what it computes instead.

`stage_blocks` returns, of the contiguous assignments that give every stage at least one block
(the last may run only the final norm and the head, where the head alone costs more than the blocks
a stage would get: llama3.2-1b from pp 5 at seq 2048 and pp 7 at 8192, llama3-8b from pp 12 and
17), one whose most expensive stage is as cheap as possible: the optimum bound is found exactly
(costs are integers), and under it each stage from the last backwards takes as many blocks as fit,
so the first stage takes the fewest. Under 1F1B stage i keeps pp - i micro-batches of activations
in flight, so blocks past the balance cost the least memory on the later stages.

The model's numbers are read duck-typed with parallel.planner.ModelShape's field names: hidden,
heads, kv_heads, ffn, layers, vocab (`ModelShape.of` reads them from a model config). No torch here.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

EMBEDDING_FLOPS = 0  # a lookup: no multiply-adds; its backward scatters one row per token


def block_flops(shape: Any, seq_len: int) -> int:
    """Training FLOPs per token of one transformer block at `seq_len`: 6 per weight (the norm gains
    included, as flops.py counts them) plus 12 x heads x head_dim x seq_len for attention."""
    h, head_dim = shape.hidden, shape.hidden // shape.heads
    weights = h * head_dim * (2 * shape.heads + 2 * shape.kv_heads) + 3 * h * shape.ffn + 2 * h
    return 6 * weights + 12 * shape.heads * head_dim * seq_len


def head_flops(shape: Any) -> int:
    """Training FLOPs per token of the final norm and the output layer (tied or not, it multiplies)."""
    return 6 * shape.hidden * (shape.vocab + 1)


def stage_flops(shape: Any, seq_len: int, blocks: Sequence[range]) -> list[int]:
    """What each stage of the assignment `blocks` costs per token: its blocks, plus the embedding on
    the first and the head on the last."""
    costs = [len(r) * block_flops(shape, seq_len) for r in blocks]
    costs[0] += EMBEDDING_FLOPS
    costs[-1] += head_flops(shape)
    return costs


def stage_blocks(shape: Any, pp: int, seq_len: int) -> list[range]:
    """The global indices of the blocks each of `pp` pipeline stages runs, balanced by training FLOPs
    at `seq_len` (the module docstring gives the cost model and the rule)."""
    return list(split(shape.layers, pp, block_flops(shape, seq_len), EMBEDDING_FLOPS, head_flops(shape)))


@functools.lru_cache(maxsize=4096)  # the planner asks for every stage of thousands of layouts
def split(layers: int, pp: int, block: int, first: int, last: int) -> tuple[range, ...]:
    """`layers` blocks of cost `block` on `pp` stages, the first also costing `first` and the last
    `last`: contiguous, at least one block on each stage but the last, the most expensive stage as
    cheap as possible, and under that bound each stage from the last backwards taking as many blocks
    as fit."""
    if not 1 <= pp <= layers:
        raise ValueError(f"{pp} pipeline stages for {layers} blocks: use between 1 and {layers} stages")
    extras = [0] * pp
    extras[0] += first
    extras[-1] += last
    # The busiest stage costs k blocks plus one stage's extra, for some k: try those bounds cheapest first.
    for bound in sorted({extra + k * block for extra in set(extras) for k in range(layers + 1)}):
        counts = _fill(layers, extras, block, bound)
        if counts is not None:
            break
    starts = [sum(counts[:i]) for i in range(pp + 1)]
    return tuple(range(starts[i], starts[i + 1]) for i in range(pp))


def _fill(layers: int, extras: list[int], block: int, bound: int) -> Optional[list[int]]:
    """Blocks per stage under `bound`, each stage from the last taking as many as fit while leaving one
    for every stage before it; None where a stage but the last gets none or the first exceeds the bound."""
    counts, left, last = [], layers, len(extras) - 1
    for stage in reversed(range(len(extras))):
        n = left if stage == 0 else min((bound - extras[stage]) // block, left - stage)
        fewest = 0 if stage == last and stage > 0 else 1
        if n < fewest or extras[stage] + n * block > bound:
            return None
        counts.append(n)
        left -= n
    return counts[::-1]
