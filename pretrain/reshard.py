"""Resharding: a checkpoint read back under another layout, from DeepSpeed's own per-rank files, only when needed.

A checkpoint holds what each rank's DeepSpeed engine wrote, nothing gathered. Under ZeRO 1 and 2 (and bf16's
BF16_Optimizer, which ZeRO-1 runs) every rank's optimizer file holds that rank's data-parallel partition of the
fp32 master weights and of AdamW's two moments, flat, one flat tensor per param group, with DeepSpeed's
`param_slice_mappings` saying where each parameter's fragment lies in it. Under ZeRO-3 every rank holds its
1/dp-th of every parameter, flat, in param-group order, with no map. What DeepSpeed does not write down is
recorded at save time by `describe_rank` into the checkpoint's marker, per rank: which plain model parameter each
DeepSpeed name is, its full unsplit shape and the dimension tensor parallelism split it along (so the split is
known exactly, not guessed from names), which parameters the rank's ZeRO 1/2 partition holds a fragment of, and
ZeRO-3's parameter order and partition sizes.

From these a rank of any layout (tp, pp, dp, ZeRO 1/2/3) rebuilds exactly its own part of every parameter: it
joins each parameter's fragments over the data-parallel ranks that wrote them (concatenated in dp order, as
partitions follow one another), copies the part it needs out of each tensor-parallel piece (vocabulary padding
left out and put back as its own layout pads), and sets it into its engine. It reads only the files of writer
ranks that hold something it needs, one model-parallel rank's files at a time, and talks to no other rank.
`full_weights` does the same offline for the whole model (export, generate).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from foundry.parallel.tensor import VOCAB_PARAMS, Shard, shard_of
from foundry.pretrain.checkpoint import MODEL_STATES, CheckpointError, safe_load

MOMENTS = ("exp_avg", "exp_avg_sq")
STATES = ("fp32", *MOMENTS)  # what each parameter has in the optimizer files: fp32 master weight, AdamW's moments

ModelRank = tuple[int, int]  # (tp, pp): one model-parallel rank, whose data-parallel ranks share its parameters


def _shard(p: torch.Tensor) -> Shard:
    """Which part of its full parameter `p` is. A ZeRO-3 parameter's own tensor is empty between uses: its shape
    is DeepSpeed's `ds_shape`."""
    if getattr(p, "shard", None) is None and hasattr(p, "ds_shape"):
        return Shard(tuple(p.ds_shape))
    return shard_of(p)


# Saving: what this rank's files hold.


def describe_rank(engine: Any, plain_names: dict[int, str]) -> dict[str, Any]:
    """What this rank's DeepSpeed files hold, as JSON-able data for the checkpoint's marker. Cheap (no tensor is
    touched): every rank calls it at every save.

    "params": for every parameter of engine.module, by its DeepSpeed name: its plain model name, full unsplit
    shape and tensor-parallel split dimension (None: whole on every tp rank), and under ZeRO 1/2 whether this rank's
    optimizer partition holds a fragment of it ("held"). Under ZeRO-3, "partitions": per optimizer sub-group, its
    parameters in order with the size of each one's partition on this rank (the flat tensors have no map)."""
    zero, stage = engine.optimizer, engine.zero_optimization_stage()
    # The fragments DeepSpeed's ZeRO 1/2 and BF16_Optimizer write into the file as `param_slice_mappings`.
    held = {name for group in getattr(zero, "_param_slice_mappings", None) or [] for name in group}
    params: dict[str, dict[str, Any]] = {}
    for ds_name, p in engine.module.named_parameters():
        shard = _shard(p)
        params[ds_name] = {"name": plain_names[id(p)], "shape": list(shard.full_shape), "dim": shard.dim}
        if stage in (1, 2):
            params[ds_name]["held"] = ds_name in held
    record: dict[str, Any] = {"params": params}
    if stage == 3:
        ds_names = {id(p): name for name, p in engine.module.named_parameters()}
        record["partitions"] = [[[ds_names[id(p)], p.partition_numel()] for p in group] for group in zero.fp16_groups]
    return record


# Reading: one writer rank's optimizer file.


class _Partition:
    """One writer rank's optimizer file, loaded: its fragment of each parameter it holds, for each of STATES."""

    def __init__(self, path: Path, zero_stage: int, record: dict[str, Any]):
        self.path = path
        saved = safe_load(path)["optimizer_state_dict"]
        # (group, start, numel) of each parameter's fragment in the group's flat tensors
        self.where: dict[str, tuple[int, int, int]] = {}
        if zero_stage == 3:
            self.flat = saved["fp32_flat_groups"]
            self.moments = saved["optimizer_state_dict"]["state"]
            for g, group in enumerate(record["partitions"]):
                offset = 0
                for ds_name, numel in group:
                    self.where[ds_name] = (g, offset, numel)
                    offset += numel
        else:
            self.flat = saved["single_partition_of_fp32_groups"]
            self.moments = saved["base_optimizer_state"]["state"]
            for g, fragments in enumerate(saved["param_slice_mappings"]):
                for ds_name, fragment in fragments.items():
                    self.where[ds_name] = (g, fragment.start, fragment.numel)

    def fragment(self, ds_name: str, key: str) -> torch.Tensor | None:
        """This rank's fragment of parameter `ds_name`'s `key` (flat), None if it holds none."""
        if ds_name not in self.where:
            return None
        g, start, numel = self.where[ds_name]
        fp32 = self.flat[g].narrow(0, start, numel)
        if key == "fp32":
            return fp32
        moments = self.moments.get(g)
        # AdamW creates its state at its first step: before any step was applied, the moments are zero.
        return torch.zeros_like(fp32) if moments is None else moments[key].narrow(0, start, numel)

    def steps(self) -> set[float]:
        """AdamW's step count in each param group (0 before the first applied step)."""
        return {float(self.moments[g]["step"]) if g in self.moments else 0.0 for g in range(len(self.flat))}


# Where each part of each parameter is.


def _box(shard: Shard) -> list[tuple[int, int]]:
    """Per dimension, the [start, stop) of the full parameter's entries (padding not included) that `shard` holds."""
    box = [(0, n) for n in shard.full_shape]
    if shard.dim is not None:
        start, stop, _ = shard.bounds()
        box[shard.dim] = (start, stop)
    return box


def _overlap(a: Shard, b: Shard) -> list[tuple[int, int]] | None:
    """The entries both parts hold, as a box; None when they share none."""
    box = [(max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(_box(a), _box(b))]
    return None if any(lo >= hi for lo, hi in box) else box


def _copy_overlap(src: torch.Tensor, src_shard: Shard, dst: torch.Tensor, dst_shard: Shard) -> None:
    """Copy the entries `src` (part `src_shard` of a parameter) shares with `dst` (part `dst_shard`) into `dst`."""
    box = _overlap(src_shard, dst_shard)
    if box is None:
        return
    for d, ((lo, hi), (src_lo, _), (dst_lo, _)) in enumerate(zip(box, _box(src_shard), _box(dst_shard))):
        src, dst = src.narrow(d, lo - src_lo, hi - lo), dst.narrow(d, lo - dst_lo, hi - lo)
    dst.copy_(src)


class _Checkpoint:
    """A checkpoint's per-rank records (the marker's "ranks"): who wrote which part of which parameter."""

    def __init__(self, tag_dir: Path, marker: dict[str, Any]):
        self.tag_dir = tag_dir
        identity = marker["identity"]
        self.zero_stage, self.tp = identity["zero_stage"], identity["layout"]["tp"]
        if "ranks" not in marker:
            raise CheckpointError(f"{tag_dir} does not record what each rank's files hold (written before resharding "
                                  f"read DeepSpeed's files): resume it under the layout and ZeRO stage that wrote it")
        if self.zero_stage == 0:
            raise CheckpointError(f"{tag_dir} was written under ZeRO-0, which is not resharded: resume it under the "
                                  f"layout that wrote it, or write the model with checkpoint.save_consolidated=true")
        self.ranks = sorted(marker["ranks"], key=lambda r: r["rank"])
        # Each model-parallel rank's data-parallel ranks, in dp order: their partitions follow one another.
        self.replicas: dict[ModelRank, list[dict[str, Any]]] = {}
        for record in sorted(self.ranks, key=lambda r: r["dp"]):
            self.replicas.setdefault((record["tp"], record["pp"]), []).append(record)
        # Each plain parameter's pieces: (model rank, DeepSpeed name, which part of the full parameter it is).
        self.pieces: dict[str, list[tuple[ModelRank, str, Shard]]] = {}
        for (tp, pp), replicas in sorted(self.replicas.items()):
            for ds_name, param in replicas[0]["params"].items():
                split = param["dim"] is not None  # part `tp` of the writer's tp parts, else whole
                shard = Shard(tuple(param["shape"]), param["dim"], tp if split else 0, self.tp if split else 1)
                self.pieces.setdefault(param["name"], []).append(((tp, pp), ds_name, shard))

    def model_states(self) -> dict[str, Any]:
        """Rank 0's DeepSpeed model-states file: the LR schedule, DeepSpeed's counters and our client state."""
        name = next((f for f in self.ranks[0]["files"] if MODEL_STATES.fullmatch(f)), None)
        if name is None:
            raise CheckpointError(f"{self.tag_dir}: rank 0 wrote no model-states file: the checkpoint is incomplete")
        return safe_load(self.tag_dir / name)

    def _options(self, name: str, want: Shard) -> list[tuple[ModelRank, ...]]:
        """The sets of model ranks whose pieces together hold all of `want`: one per pipeline stage holding the
        parameter (tied embeddings live on the first and last), one per tp rank where each holds it whole."""
        pieces = self.pieces.get(name)
        if not pieces:
            raise CheckpointError(f"{self.tag_dir} holds no parameter {name}: it was written for another model")
        if list(pieces[0][2].full_shape) != list(want.full_shape):
            raise CheckpointError(f"{self.tag_dir}: {name} has shape {list(pieces[0][2].full_shape)}, this model's "
                                  f"has {list(want.full_shape)}: it was written for another model")
        options: list[tuple[ModelRank, ...]] = []
        for pp in sorted({rank[1] for rank, _, _ in pieces}):
            here = [(rank, shard) for rank, _, shard in pieces if rank[1] == pp]
            whole = [rank for rank, shard in here if shard.dim is None]
            options += [(rank,) for rank in whole] or [tuple(rank for rank, shard in here if _overlap(shard, want))]
        return [ranks for ranks in options if ranks]

    def plan(self, wanted: dict[str, Shard]) -> dict[ModelRank, list[str]]:
        """Which parameters to take from which model rank, reading as few model ranks' files as can be: a
        parameter with a choice (replicated over tp, or tied over pipeline stages) is taken from a model rank
        that is read anyway."""
        options = {name: self._options(name, want) for name, want in wanted.items()}
        plan: dict[ModelRank, list[str]] = {}
        for name in sorted(options, key=lambda n: len(options[n])):  # those without a choice first
            best = min(options[name], key=lambda ranks: len(set(ranks) - plan.keys()))  # the first of equals
            for rank in best:
                plan.setdefault(rank, []).append(name)
        return plan

    def gather(self, wanted: dict[str, Shard], keys: tuple[str, ...],
               done: Callable[[str, dict[str, torch.Tensor]], None]) -> float:
        """For each parameter `wanted` names, the part the Shard says (padding zero), of each of `keys`:
        handed to `done(name, {key: tensor})` as soon as it is complete, so that a rank holds one model rank's
        files at a time. Returns AdamW's step count."""
        plan = self.plan(wanted)
        waiting = {name: sum(name in names for names in plan.values()) for name in wanted}
        parts: dict[str, dict[str, torch.Tensor]] = {}
        steps: set[float] = set()
        for rank, names in sorted(plan.items()):
            held = {name: (ds_name, shard) for name in names for r, ds_name, shard in self.pieces[name] if r == rank}
            partitions = self._read(rank, [ds_name for ds_name, _ in held.values()])
            steps |= {s for partition in partitions for s in partition.steps()}
            for name, (ds_name, shard) in held.items():
                want = wanted[name]
                part = parts.setdefault(name, {key: torch.zeros(want.shape) for key in keys})
                for key in keys:
                    _copy_overlap(self._joined(partitions, ds_name, shard, key), shard, part[key], want)
                waiting[name] -= 1
                if not waiting[name]:
                    done(name, parts.pop(name))
        if len(steps) > 1:
            raise CheckpointError(f"{self.tag_dir}: AdamW's step count differs between ranks or param groups "
                                  f"({sorted(steps)}): the checkpoint is inconsistent; resume from another")
        return steps.pop() if steps else 0.0

    def _read(self, rank: ModelRank, ds_names: list[str]) -> list[_Partition]:
        """The optimizer files of model rank `rank`'s data-parallel ranks that hold a fragment of `ds_names` (every
        one under ZeRO-3, where each holds a part of every parameter), in dp order."""
        partitions = []
        for record in self.replicas[rank]:
            if self.zero_stage != 3 and not any(record["params"][n].get("held") for n in ds_names):
                continue
            name = next((f for f in record["files"] if f.endswith("optim_states.pt")), None)
            if name is None:
                raise CheckpointError(f"{self.tag_dir}: rank {record['rank']} wrote no optimizer file: the "
                                      f"checkpoint is incomplete")
            partitions.append(_Partition(self.tag_dir / name, self.zero_stage, record))
        return partitions

    def _joined(self, partitions: list[_Partition], ds_name: str, shard: Shard, key: str) -> torch.Tensor:
        """The whole piece `shard` of a parameter from its fragments, in the shape the writer held it."""
        fragments = [f for p in partitions if (f := p.fragment(ds_name, key)) is not None]
        numel = math.prod(shard.shape)
        flat = torch.cat(fragments) if fragments else torch.empty(0)
        if flat.numel() < numel:  # ZeRO-3's last partition is padded: more is fine, less is not
            raise CheckpointError(f"{self.tag_dir}: the optimizer files hold {flat.numel()} of the {numel} values of "
                                  f"{ds_name}: the checkpoint is incomplete or damaged; resume from another")
        return flat[:numel].view(shard.shape)


# Loading into an engine of another layout.


def load_resharded(engine: Any, tag_dir: Path, marker: dict[str, Any], names: dict[int, str], tp_rank: int, tp: int,
                   vocab_size: int) -> dict[str, Any]:
    """Set the fp32 master weights and the module's own parameters, AdamW's moments and step count, and the LR
    schedule of `engine` (ZeRO 1, 2 or 3; fp32, or bf16 with BF16_Optimizer; any tp/pp/dp) from a checkpoint
    written under another layout (`marker`: its COMPLETE.json). `names`: id(parameter) -> plain model name.
    Reads only the files of writer ranks holding parameters this rank needs; collective-free. AdamW's step count
    is the saved optimizer's (the training step minus the steps skipped). Returns rank 0's model-states file, which
    holds the client state."""
    ckpt = _Checkpoint(tag_dir, marker)
    target = _Target(engine)
    params = {names[id(p)]: p for p in engine.module.parameters()}
    wanted = {name: _shard(p) for name, p in params.items()}
    for name, want in wanted.items():
        if want.dim is not None and (want.rank, want.parts) != (tp_rank, tp):
            raise CheckpointError(f"{name} is part {want.rank} of {want.parts}, not this rank's {tp_rank} of tp {tp}")
        if name in VOCAB_PARAMS and want.full_shape[0] != vocab_size:
            raise CheckpointError(f"{name} has {want.full_shape[0]} rows, not the vocabulary's {vocab_size}")
    step = ckpt.gather(wanted, STATES, lambda name, state: target.set(params[name], state))
    target.finish(step)
    saved = ckpt.model_states()
    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(saved["lr_scheduler"])
    scheduler.step(scheduler.last_batch_iteration)  # loading sets the counter, this the lr
    # DeepSpeed's own counters, as its load_checkpoint restores them.
    engine.global_steps, engine.skipped_steps = saved["global_steps"], saved["skipped_steps"]
    engine.global_samples = saved.get("global_samples", engine.global_steps * engine.train_batch_size())
    return saved


class _Target:
    """The engine's ZeRO optimizer, taking each parameter's part of the fp32 weight and AdamW's moments."""

    def __init__(self, engine: Any):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        stage = engine.zero_optimization_stage()
        if stage == 0:
            raise CheckpointError("loading a checkpoint written under another layout needs ZeRO 1, 2 or 3 here: "
                                  "set parallel.zero_stage=1, or resume under the layout that wrote it")
        self.zero, self.zero3, self.available = engine.optimizer, stage == 3, ZeroParamStatus.AVAILABLE
        # AdamW's flat fp32 partitions, by ZeRO-3, ZeRO 1/2 and BF16_Optimizer (bf16 under ZeRO-1) in turn.
        zero = self.zero
        self.flats = (zero.fp32_partitioned_groups_flat if self.zero3 else
                      getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_groups_flat_partition)
        # DeepSpeed creates AdamW's state at the first step: create it now, so that it can be set.
        for flat in self.flats:
            zero.optimizer.state[flat] = {"step": torch.tensor(0.0), **{k: torch.zeros_like(flat) for k in MOMENTS}}
        if not self.zero3:
            zero._hp_optimizer_states_linked = False  # link each parameter's fragment to the moments just made
            zero._lazy_init_hp_params_optimizer_state()

    def set(self, p: torch.nn.Parameter, state: dict[str, torch.Tensor]) -> None:
        """Parameter `p`'s part (as its Shard says) of the fp32 weight and moments; `p` itself from the fp32 weight."""
        from deepspeed.utils import (safe_set_full_fp32_param, safe_set_full_optimizer_state,
                                     safe_set_local_fp32_param, safe_set_local_optimizer_state)

        state = {k: v.to(p.device) for k, v in state.items()}
        if not self.zero3:
            safe_set_full_fp32_param(p, state["fp32"])
            for key in MOMENTS:
                safe_set_full_optimizer_state(p, state[key], key)
            p.data.copy_(state["fp32"].to(p.dtype))
            return
        # ZeRO-3: this rank's 1/dp of the flattened parameter, the last rank's padded with zeros. (DeepSpeed's
        # set-full functions cut it themselves, but cannot for the last rank of a size dp does not divide.)
        group = p.ds_process_group
        n, rank, parts = p.ds_tensor.ds_numel, dist.get_rank(group), dist.get_world_size(group)
        mine = {k: F.pad(v.flatten(), (0, n * parts - v.numel())).narrow(0, n * rank, n) for k, v in state.items()}
        safe_set_local_fp32_param(p, mine["fp32"])
        for key in MOMENTS:
            safe_set_local_optimizer_state(p, mine[key], key)
        p.ds_tensor.data.copy_(mine["fp32"].to(p.ds_tensor.dtype))
        if p.ds_status == self.available:  # gathered whole (a small one kept so after a forward): that copy too
            p.data.copy_(state["fp32"].view(p.ds_shape).to(p.dtype))

    def finish(self, step: float) -> None:
        """AdamW's step count, kept as the optimizer keeps it: torch's as a tensor (on the parameters' device when
        fused or capturable), DeepSpeed's FusedAdam (kernels.optimizer=deepspeed-fused) as a number."""
        optimizer = self.zero.optimizer
        torch_adamw = type(optimizer).__module__.startswith("torch.")
        on_device = optimizer.param_groups[0].get("fused") or optimizer.param_groups[0].get("capturable")
        for flat in self.flats:
            optimizer.state[flat]["step"] = (torch.tensor(step, device=flat.device if on_device else "cpu")
                                             if torch_adamw else int(step))


# Offline: the whole model.


def full_state(tag_dir: Path, marker: dict[str, Any],
               keys: tuple[str, ...] = STATES) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    """Every parameter of the plain model whole (vocabulary padding removed), by its plain name: `keys` of
    fp32 weight and AdamW moments; and AdamW's step count. Offline, from any layout's checkpoint (ZeRO 1/2/3)."""
    ckpt = _Checkpoint(tag_dir, marker)
    wanted = {name: Shard(pieces[0][2].full_shape) for name, pieces in ckpt.pieces.items()}
    full: dict[str, dict[str, torch.Tensor]] = {}
    step = ckpt.gather(wanted, keys, full.__setitem__)
    return full, step


def full_weights(tag_dir: Path, marker: dict[str, Any], vocab_size: int,
                 tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """The plain model's fp32 state dict (model.Llama's names), offline, from any layout's checkpoint (ZeRO 1/2/3).
    Used by `foundry generate`, `foundry convert export` and tests."""
    weights = {name: state["fp32"] for name, state in full_state(tag_dir, marker, ("fp32",))[0].items()}
    for name in VOCAB_PARAMS:
        if name in weights and weights[name].shape[0] != vocab_size:
            raise CheckpointError(f"{tag_dir}: {name} has {weights[name].shape[0]} rows, the model's vocabulary "
                                  f"{vocab_size}: it was written for another model")
    if tie_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return weights
