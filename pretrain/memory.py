"""Bytes one rank holds, by category: parameters, gradients, optimizer state, DeepSpeed's buffers and
activations. Three ways to know them:

- `census`: a live DeepSpeed engine's tensors, counted by what holds them, for a rank that fits this
  machine (benchmarks/memory.py runs it on real jobs).
- `engine_bytes`: DeepSpeed 0.19.8's own rules for what its engine allocates, applied to a rank's
  parameters without an engine. Only their shapes are read, so meta or fake tensors of any size do
  (`deepspeed.initialize` itself fails under FakeTensorMode). tests/test_memory.py holds the rules to
  the census of real engines.
- `SavedTensors` and `stage_activations`: activations measured, not modelled: the bytes autograd saves
  for backward, live and at their peak, with real tensors or under torch's FakeTensorMode, where the
  forward and backward of a 70B-sized pipeline stage cost nothing.

DeepSpeed's rules, read from its runtime/engine.py, zero/stage_1_and_2.py, zero/stage3.py,
bf16_optimizer.py and fp16/unfused_optimizer.py. P is the rank's parameter count, `model` the bytes per
element of its dtype (bf16 2, fp32 4), `accum` those of data_types.grad_accum_dtype (default: the
model's), dp the data-parallel size. ZeRO 1-2 and BF16_Optimizer flatten the parameters per optimizer
group (decay, no decay: engine.param_groups) in their order, pad each group to a multiple of 2 x dp
elements and cut it into dp equal partitions; ZeRO-3 cuts each parameter into dp parts of
ceil(numel / dp) elements.

    the wrapper (engine._do_optimizer_sanity_check)
      ZeRO-0         fp32: torch's AdamW itself; bf16: FP16_UnfusedOptimizer, or BF16_Optimizer under
                     pipelining; bf16 with fp32 accumulation is refused (NotImplementedError)
      ZeRO-1         bf16 with fp32 accumulation: BF16_Optimizer; else DeepSpeedZeroOptimizer
      ZeRO-2, 3      DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3
    params           model x P, with the flat groups' padding; ZeRO-3: model x (the parameters' parts +
                     whole copies of the persistent ones, <= zero_optimization.param_persistence_threshold
                     elements, 1e5 by default)
    optimizer        AdamW's fp32 exp_avg and exp_avg_sq, a 4-byte step per tensor it steps, and the fp32
                     master copy it steps: torch's AdamW 8 x P (no copy); FP16_UnfusedOptimizer 12 x P;
                     ZeRO 1-2 and BF16_Optimizer 12 x the partition (the copy is a clone, also of an fp32
                     model); ZeRO-3 12 x the parts
    grads            the most alive at once in backward, outside the bucket:
      ZeRO-0, ZeRO-1 model x P, whole (ZeRO-1 reduces them at the accumulation boundary)
      BF16_Optimizer accum x the padded groups, for good, + model x P (param.grad, until the step)
      ZeRO-2         model x W, W the whole parameters the partition touches (`grads_in_partition`),
                     + accum x W (`all_grad_tensors`, what earlier micro-batches accumulated) when a step
                     has several; with fp32 accumulation of bf16 weights 4 x the partition instead, the
                     partition's own gradients larger than the bucket kept whole until backward ends
      ZeRO-3         accum x the parts
      + from ZeRO-1  gradients larger than the reduce bucket bypass it and live until the next reduction:
                     the most of them alive at once, in backward order (the parameters' reversed)
    bucket           zero_optimization.reduce_bucket_size elements of the model dtype (ZeRO-3: the
                     communication dtype), allocated whole (x 2 with overlap_comm under ZeRO 1-2): during
                     backward under ZeRO 1-2, for good under ZeRO-3; none without ZeRO or with BF16_Optimizer

Not counted: ZeRO-3's gathered weights of the blocks being computed (the planner's `gathered`) and the
optimizer step's transient copies (fp32 upcasts of gradients), both short-lived.
"""

from __future__ import annotations

import gc
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from foundry.pretrain.engine import param_groups

# Counting a live engine's bytes.

# Where DeepSpeed 0.19.8 keeps gradients besides `param.grad` (found by a census of live tensors).
GRADIENT_HOLDERS = (
    "averaged_gradients",  # ZeRO-1/2: this rank's reduced partition, at the accumulation boundary
    "all_grad_tensors",  # ZeRO-2: the partition accumulated between micro-batches
    "grads_in_partition",  # ZeRO-2: the current micro-batch's reduced partition, during backward
    "grad_partitions_flat_buffer",  # ZeRO-3: this rank's gradient partition
    "fp32_groups_gradients_flat",  # BF16_Optimizer (ZeRO-1 with fp32 accumulation; pipelines): fp32 accumulation
)


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors inside nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors_in(value)


Span = tuple[int, int]


def spans(tensors: Iterable[torch.Tensor], whole_storage: bool = False) -> list[Span]:
    """Address ranges of the tensors' elements (or of their whole storages)."""
    out = []
    for t in tensors:
        if whole_storage:
            storage = t.untyped_storage()
            start, size = storage.data_ptr(), storage.nbytes()
        else:
            start, size = t.data_ptr(), t.numel() * t.element_size()
        if size:
            out.append((start, start + size))
    return out


def covered(ranges: Iterable[Span]) -> int:
    """Bytes in the union of the ranges."""
    total, end = 0, -1
    for lo, hi in sorted(ranges):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def live_tensors() -> list[torch.Tensor]:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on some lazy module objects warns
        return [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and not o.is_meta]


def census(engine: Any, model: torch.nn.Module, others: bool = False) -> dict[str, int]:
    """Bytes this rank holds now, by holder. Each category excludes what an earlier one counted, so
    gradients sitting in the reduce bucket count as bucket (and are reported as "grads in bucket").
    With `others`, also every other live tensor's bytes (a scan of the heap: slow)."""
    params = list(model.parameters())
    outer = engine.optimizer
    inner = getattr(outer, "optimizer", outer)  # ZeRO wraps torch's AdamW; ZeRO-0 in fp32 is AdamW itself
    # What AdamW steps: its param groups, and the keys of its state (ZeRO-3 empties the groups between steps).
    stepped = [p for g in inner.param_groups for p in g["params"]] + list(inner.state)
    grads = spans([p.grad for p in params + stepped if p.grad is not None]
                  + [t for name in GRADIENT_HOLDERS for t in tensors_in(getattr(outer, name, None))])
    bucket = spans([t for b in getattr(outer, "ipg_buckets", {}).values() for t in tensors_in(b.buffer)],
                   whole_storage=True)
    held = {
        "params": spans([p.data for p in params] + [p.ds_tensor for p in params if hasattr(p, "ds_tensor")]),
        "bucket": bucket,
        "grads": grads,
        "optim": spans(stepped + list(tensors_in(list(inner.state.values())))),
    }
    out, seen = {}, []
    for name, ranges in held.items():
        out[name] = covered(ranges + seen) - covered(seen)
        seen += ranges
    out["grads in bucket"] = covered(grads) - out["grads"]
    if others:
        everything = spans(live_tensors(), whole_storage=True)
        out["other"] = covered(everything + seen) - covered(seen)
    return out


# DeepSpeed's rules, without an engine.

MASTER = 4  # the fp32 master copy, per element
MOMENTS = 8  # AdamW's fp32 exp_avg and exp_avg_sq, per element
STEP = 4  # AdamW's `step`, an fp32 scalar tensor per tensor it steps


@dataclass(frozen=True)
class EngineBytes:
    """What DeepSpeed's engine holds on one rank, in `census`'s categories: grads and bucket at their
    most in backward, params and optimizer for good."""

    wrapper: str  # the optimizer DeepSpeed puts around AdamW, `type(engine.optimizer).__name__`
    params: int
    grads: int
    optimizer: int
    bucket: int


def engine_bytes(module: nn.Module, ds_config: dict[str, Any], dp: int, dp_rank: int = 0,
                 pipeline: bool = False) -> EngineBytes:
    """The bytes DeepSpeed 0.19.8 allocates on data-parallel rank `dp_rank` of `dp` for `module` (the rank's
    own parameters: tensor-parallel slices, its pipeline stage; real, meta or fake tensors) under
    `ds_config` (foundry.pretrain.engine.deepspeed_config's), by the rules in the module docstring.
    `pipeline`: the module is a stage of DeepSpeed's PipelineModule. Raises NotImplementedError where
    DeepSpeed refuses the config, ValueError for what these rules do not cover (offload, fp16)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero_cfg = DeepSpeedZeroConfig(**ds_config.get("zero_optimization", {}))
    if ds_config.get("fp16", {}).get("enabled") or zero_cfg.offload_optimizer or zero_cfg.offload_param \
            or zero_cfg.round_robin_gradients:
        raise ValueError("engine_bytes covers bf16 and fp32 without offload or round-robin gradients")
    zero = int(zero_cfg.stage)
    model_dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
    accum_dtype = _dtype(ds_config.get("data_types", {}).get("grad_accum_dtype")) or model_dtype
    comm_dtype = _dtype(ds_config.get("communication_data_type")) or model_dtype
    if accum_dtype not in (model_dtype, torch.float32):
        raise ValueError(f"engine_bytes covers gradients accumulated in the model's dtype or fp32, not {accum_dtype}")
    m, a, c = (_itemsize(d) for d in (model_dtype, accum_dtype, comm_dtype))
    groups = [g["params"] for g in param_groups(module, 0.0) if g["params"]]  # DeepSpeed drops empty groups
    ordered = [p for p in module.parameters() if p.requires_grad]
    n = sum(p.numel() for p in ordered)
    gas = int(ds_config.get("gradient_accumulation_steps", 1))
    bucket_elements = int(zero_cfg.reduce_bucket_size)
    oversized = [p for p in ordered if p.numel() > bucket_elements]  # their gradients bypass the bucket

    wrapper = _wrapper(zero, model_dtype, accum_dtype, pipeline)
    if wrapper == "AdamW":
        return EngineBytes(wrapper, m * n, m * n, MOMENTS * n + STEP * len(ordered), 0)
    if wrapper == "FP16_UnfusedOptimizer":
        return EngineBytes(wrapper, m * n, m * n, (MASTER + MOMENTS) * n + STEP * len(ordered), 0)
    if wrapper == "DeepSpeedZeroOptimizer_Stage3":
        return _stage3(module, groups, zero_cfg, dp, m, a, c, oversized)

    flat = [_FlatGroup(g, dp, dp_rank) for g in groups]
    padded = sum(g.padded for g in flat)
    partition = sum(g.partition for g in flat)
    optimizer = (MASTER + MOMENTS) * partition + STEP * len(flat)
    if wrapper == "BF16_Optimizer":
        return EngineBytes(wrapper, m * padded, a * padded + m * n, optimizer, 0)

    # The pipeline engine turns overlap_comm off; with it on, ZeRO 1-2 allocate two buckets.
    bucket = bucket_elements * m * (2 if zero_cfg.overlap_comm and not pipeline else 1) \
        if zero_cfg.contiguous_gradients else 0
    if zero == 1:
        return EngineBytes(wrapper, m * padded, m * n, optimizer, bucket)
    touched = [p for g in flat for p in g.touched()]
    if accum_dtype == torch.float32 and model_dtype != torch.float32:  # the "compact" fp32 partition
        kept = {id(p) for p in touched}
        grads = a * partition + m * _most_in_flight(oversized, kept)
    else:
        w = sum(p.numel() for p in touched)
        grads = m * w + (a * w if gas > 1 else 0) + m * _most_in_flight(oversized, set())
    return EngineBytes(wrapper, m * padded, grads, optimizer, bucket)


def _wrapper(zero: int, model: torch.dtype, accum: torch.dtype, pipeline: bool) -> str:
    """The optimizer DeepSpeed wraps AdamW in: engine._do_optimizer_sanity_check's choice."""
    if zero >= 1:
        if zero == 1 and model == torch.bfloat16 and accum == torch.float32:
            return "BF16_Optimizer"
        return "DeepSpeedZeroOptimizer_Stage3" if zero == 3 else "DeepSpeedZeroOptimizer"
    if model != accum:
        raise NotImplementedError(f"DeepSpeed refuses ZeRO-0 with {model=} and grad_accum_dtype {accum}")
    if model == torch.float32:
        return "AdamW"
    return "BF16_Optimizer" if pipeline else "FP16_UnfusedOptimizer"


class _FlatGroup:
    """One optimizer group flattened as ZeRO 1-2 and BF16_Optimizer do: padded to a multiple of 2 x dp
    elements (nccl_start_alignment_factor x dp), cut into dp equal partitions."""

    def __init__(self, params: Sequence[torch.Tensor], dp: int, rank: int):
        self.params, self.rank = params, rank
        numel = sum(p.numel() for p in params)
        self.padded = math.ceil(numel / (2 * dp)) * 2 * dp
        self.partition = self.padded // dp

    def touched(self) -> list[torch.Tensor]:
        """The parameters with an element in this rank's partition (`params_in_partition`)."""
        lo, hi = self.rank * self.partition, (self.rank + 1) * self.partition
        out, start = [], 0
        for p in self.params:
            if start < hi and start + p.numel() > lo:
                out.append(p)
            start += p.numel()
        return out


def _stage3(module: nn.Module, groups: list[list[torch.Tensor]], zero_cfg: Any, dp: int, m: int, a: int, c: int,
            oversized: list[torch.Tensor]) -> EngineBytes:
    """ZeRO-3: each parameter cut into dp parts of ceil(numel / dp); the small ones also kept whole."""
    persistent = 0  # DeepSpeedZeRoOffload.mark_persistent_parameters
    for p in module.parameters():
        n = p.numel()
        if n <= zero_cfg.param_persistence_threshold and persistent + n <= zero_cfg.model_persistence_threshold:
            persistent += n
    parts = [[math.ceil(p.numel() / dp) for p in g] for g in groups]
    part = sum(map(sum, parts))
    steps = sum(len(_sub_groups(g, zero_cfg.sub_group_size)) for g in parts)
    bucket = zero_cfg.reduce_bucket_size * c if zero_cfg.contiguous_gradients else 0
    return EngineBytes("DeepSpeedZeroOptimizer_Stage3", m * (part + persistent),
                       a * part + m * _most_in_flight(oversized, set()), (MASTER + MOMENTS) * part + STEP * steps,
                       bucket)


def _sub_groups(parts: list[int], size: int) -> list[list[int]]:
    """stage3._create_fp16_sub_groups: a group's parts in runs of at least `size` elements, each stepped alone."""
    if size >= sum(parts):
        return [parts]
    out, run = [], []
    for i, n in enumerate(parts):
        run.append(n)
        if sum(run) >= size or i == len(parts) - 1:
            out.append(run)
            run = []
    return out


def _most_in_flight(oversized: list[torch.Tensor], kept: set[int]) -> int:
    """The most elements of gradients too large for the bucket alive at once: each lives until the next
    reduction (the next such gradient, at the latest), those in `kept` until backward ends; gradients
    arrive in the parameters' reverse order."""
    most = held = 0
    for p in reversed(oversized):
        if id(p) in kept:
            held += p.numel()
            most = max(most, held)
        else:
            most = max(most, held + p.numel())
    return most


def _dtype(name: Any) -> torch.dtype | None:
    if name is None:
        return None
    from deepspeed.runtime.config import DtypeEnum

    return DtypeEnum(name).value


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


# Activations, measured.


def _storage_key(t: torch.Tensor) -> int:
    """An identity of the memory under `t`, shared by its views, valid for real, meta and fake tensors."""
    return t.untyped_storage()._cdata


class _Saved:
    """What autograd keeps for one saved tensor while a `SavedTensors` is active; tells it when freed."""

    __slots__ = ("tensor", "_owner", "_key")

    def __init__(self, tensor: torch.Tensor, owner: SavedTensors, key: int):
        self.tensor = tensor.detach()  # no grad_fn: an output saved by its own node would hold itself
        self._owner, self._key = owner, key

    def __del__(self) -> None:
        self._owner._release(self._key)


class SavedTensors:
    """A context manager counting the bytes of the tensors autograd saves for backward in forwards run inside
    it: `live`, those still held (until backward frees their graph, or the graph is dropped, also after the
    block is left), and `peak`, the most held at once. A storage saved several times, or through views,
    counts once, whole. Tensors sharing memory with `exclude` (a module's parameters and buffers, or
    tensors) are not activations and are not counted. Works alike with real tensors and under
    FakeTensorMode.

    Not seen: what torch.utils.checkpoint's recomputation saves in backward (it keeps those in its own
    frame); a checkpointed block's inputs, saved in forward, are."""

    def __init__(self, exclude: nn.Module | Iterable[torch.Tensor] = ()):
        tensors = [*exclude.parameters(), *exclude.buffers()] if isinstance(exclude, nn.Module) else list(exclude)
        self._excluded = {_storage_key(t) for t in tensors}
        self._refs: dict[int, int] = {}  # storage -> saved tensors holding it
        self._sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0
        self._hooks: Any = None

    def __enter__(self) -> SavedTensors:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    def reset_peak(self) -> None:
        self.peak = self.live

    def _pack(self, t: torch.Tensor) -> Any:
        key = _storage_key(t)
        if key in self._excluded:
            return t
        if key not in self._refs:
            self._refs[key] = 0
            self._sizes[key] = t.untyped_storage().nbytes()
            self.live += self._sizes[key]
            self.peak = max(self.peak, self.live)
        self._refs[key] += 1
        return _Saved(t, self, key)

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Saved) else packed

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if not self._refs[key]:
            del self._refs[key]
            self.live -= self._sizes.pop(key)


@dataclass(frozen=True)
class StageActivations:
    """A pipeline stage's activations over the 1F1B schedule (`stage_activations`)."""

    in_flight: int  # micro-batches whose forward ran before the first backward
    per_micro_batch: list[int]  # saved bytes each forward added
    peak: int  # the most saved bytes alive at once
    outputs: int  # bytes of the in-flight outputs the pipeline keeps for their backward (not saved tensors)
    left: int  # saved bytes still alive after the last backward: 0 unless something keeps a graph


def stage_activations(stage: Callable[[Any], torch.Tensor], make_input: Callable[[int], Any], in_flight: int,
                      exclude: nn.Module | Iterable[torch.Tensor] = ()) -> StageActivations:
    """Run a pipeline stage as 1F1B runs it at its fullest: the forwards of `in_flight` micro-batches
    (min(pp - stage, micro-batches per step)) with their graphs held, then their backwards, oldest first,
    counting the bytes autograd saves (`SavedTensors`, `exclude` as there). `stage(make_input(i))` is micro-batch
    i's forward: tokens to activations on the first stage, activations to the loss on the last, activations
    to activations between (its input needs requires_grad, as a received activation has). Each output's
    gradient is ones, so values are never read: under FakeTensorMode it costs nothing."""
    saved = SavedTensors(exclude)
    outputs, added = [], []
    with saved:
        for i in range(in_flight):
            before = saved.live
            outputs.append(stage(make_input(i)))
            added.append(saved.live - before)
    held = sum(out.untyped_storage().nbytes() for out in outputs if out.dim())
    for out in outputs:
        out.backward(torch.ones_like(out))
    outputs.clear()
    return StageActivations(in_flight, added, saved.peak, held, saved.live)
