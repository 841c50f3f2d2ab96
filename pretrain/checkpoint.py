"""Checkpoints that never load half: save through the DeepSpeed engine, then mark complete.

A checkpoint is the directory `checkpoints/step00000100/`: DeepSpeed's model and optimizer files
(with the LR schedule inside), one RNG file per rank, the resolved config, and our client state
(step, tokens, data position). The save is complete only when, after every rank has written,
rank 0 writes `COMPLETE.json` listing every file with its size and then atomically replaces the
pointer `checkpoints/latest_complete`. A crash or kill at any moment before that leaves the
previous pointer, and thus the previous checkpoint, as the one that loads; a directory without
its marker is never loaded. Before loading, every listed file is checked to exist with its
recorded size, and the model and layout to match this run. The newest `keep` complete
checkpoints are kept; older ones and abandoned partial ones are deleted after each save.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from foundry.parallel.tensor import VOCAB_PARAMS, Shard
from foundry.pretrain.config import first_line

log = logging.getLogger("foundry")

POINTER = "latest_complete"
MARKER = "COMPLETE.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as a whole; the message names the missing piece."""


class SaveError(RuntimeError):
    """A save that failed on some rank (disk full, no permission); the previous checkpoint is untouched."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader (or a crash) sees the old or the new file whole, never part."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # several nodes may write the same file
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no litter
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power cut
    finally:
        os.close(fd)


def safe_load(path: Path | str, map_location: Any = "cpu") -> Any:
    """torch.load that runs no code: tensors, plain containers and numbers, and DeepSpeed's own small data
    classes. A file that needs anything else (a pickle could run any command) is refused with CheckpointError."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        with torch.serialization.safe_globals([fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(e))
        raise CheckpointError(f"{path} holds a Python object ({found.group(1) if found else 'not plain data'}) that "
                              f"loading would have to run code for: refused; load only checkpoints written by "
                              f"foundry, and check where this one came from") from None


def _rng_state() -> dict[str, Any]:
    # numpy's state as plain data (its array as a tensor), so that the file loads without unpickling code
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    gauss), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine: Any, ckpt_dir: Path, step: int, client_state: dict[str, Any], identity: dict[str, Any],
         keep: int, also: Any = None, notes: dict[str, Any] | None = None) -> None:
    """Collective: every rank calls. `identity` (model config, layout) must match to load it exactly;
    `also(tag_dir)`, if given, writes more files into the checkpoint on every rank before it is sealed;
    rank 0's `notes` go into the marker, readable before any engine exists (`read_notes`).

    A write that fails on any rank (disk full, no permission) fails the save on every rank with SaveError,
    after the partial directory is removed: the pointer still names the previous checkpoint."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    rank = dist.get_rank()
    writes = _Writes(engine)
    with writes.into_engine():
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    rng_file = tag_dir / f"rng_rank{rank:05d}.pt"
    writes.attempt(rng_file, torch.save, _rng_state(), rng_file)
    if also is not None:
        writes.attempt(tag_dir, also, tag_dir)  # its collectives come before its writes: a failure cannot split them
    writes.agree(tag_dir)  # every rank's files are written
    if rank == 0:
        # Not the marker itself: a run that started over may be saving into an old run's directory of this step.
        files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
                 if p.is_file() and p.name != MARKER}
        marker = json.dumps({"step": step, "identity": identity, "notes": notes or {}, "files": files}, indent=1)
        writes.attempt(tag_dir / MARKER, write_atomic, tag_dir / MARKER, marker)
        if not writes.errors:
            writes.attempt(ckpt_dir / POINTER, write_atomic, ckpt_dir / POINTER, tag)
    writes.agree(tag_dir)
    if rank == 0:
        _prune(ckpt_dir, keep, newest=tag)
    log.info("checkpoint %s saved (%d kept)", tag_dir, keep)


class _Writes:
    """A save's file writes on this rank, with the errors they raised kept rather than thrown: DeepSpeed's
    save runs collectives between its writes, and a rank that raised out of it would leave the others
    waiting in them until the collective timeout. The ranks compare notes at `agree`."""

    def __init__(self, engine: Any):
        self.engine, self.errors = engine, []

    def attempt(self, path: Path | str, write: Any, *args: Any, **kwargs: Any) -> None:
        """`write(*args, **kwargs)`, which writes `path`."""
        try:
            write(*args, **kwargs)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its zip writer
            where = Path(path) if Path(path).is_dir() else Path(path).parent
            free = shutil.disk_usage(where).free if where.exists() else 0
            self.errors.append(f"writing {path}: {type(e).__name__}: {first_line(e)} ({free / 2**20:.1f} MiB free "
                               f"there)")

    @contextlib.contextmanager
    def into_engine(self):
        """Route DeepSpeed's writes (its checkpoint engine, and the recovery script it copies) through `attempt`."""
        engine, writer = self.engine, self.engine.checkpoint_engine
        attempt = self.attempt

        class Recorded:
            def __getattr__(self, name: str) -> Any:
                return getattr(writer, name)

            def save(self, state_dict: Any, path: str) -> None:
                attempt(path, writer.save, state_dict, path)

            def makedirs(self, path: str, exist_ok: bool = False) -> None:
                attempt(path, writer.makedirs, path, exist_ok=exist_ok)

        copy_script = engine._copy_recovery_script
        engine.checkpoint_engine = Recorded()
        engine._copy_recovery_script = lambda path: attempt(path, copy_script, path)
        try:
            yield
        finally:
            engine.checkpoint_engine = writer
            del engine._copy_recovery_script

    def agree(self, tag_dir: Path) -> None:
        """Collective: raise SaveError on every rank if a write failed on any, after removing `tag_dir`."""
        failed = torch.tensor(float(bool(self.errors)))
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if not failed:
            return
        messages: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(messages, self.errors[0] if self.errors else None)
        if dist.get_rank() == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)  # frees what it took: the disk may be the one that is full
        rank, first = next((r, m) for r, m in enumerate(messages) if m)
        previous = find_latest(tag_dir.parent)
        raise SaveError(f"checkpoint {tag_dir.name} was not saved: rank {rank}: {first}; "
                        f"{'the previous checkpoint ' + previous if previous else 'no earlier checkpoint'} is still "
                        f"the one a resume loads; free space or fix permissions in {tag_dir.parent}, or set "
                        f"checkpoint.continue_on_save_error=true to train on without saving")


def _prune(ckpt_dir: Path, keep: int, newest: str) -> None:
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
    complete = [t for t in tags if (ckpt_dir / t / MARKER).is_file()]
    keep_tags = set(complete[-keep:]) | {newest}
    for t in tags:
        if t not in keep_tags and t < newest:  # partial saves newer than the pointer may be in flight elsewhere
            shutil.rmtree(ckpt_dir / t, ignore_errors=True)


def verify(tag_dir: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The marker of a complete checkpoint that this run can load; CheckpointError otherwise."""
    marker = tag_dir / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{tag_dir} has no {MARKER}: its save did not finish; it cannot be loaded "
                              f"(resume from an older checkpoint or start fresh)")
    info = json.loads(marker.read_text())
    for name, size in info["files"].items():
        path = tag_dir / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {tag_dir} is missing {name}: restore it or resume from another")
        if path.stat().st_size != size:
            raise CheckpointError(f"checkpoint {tag_dir}: {name} has {path.stat().st_size} bytes, {size} were "
                                  f"written: the file is damaged; restore it or resume from another")
    for key, expected in identity.items():
        if info["identity"].get(key) != expected:
            raise CheckpointError(f"checkpoint {tag_dir} was written for {key}={info['identity'].get(key)}, "
                                  f"this run has {key}={expected}: use the same {key} to resume it")
    return info


def read_notes(tag_dir: Path) -> dict[str, Any]:
    """The `notes` a complete checkpoint was saved with (e.g. the MLflow run it continues)."""
    return json.loads((tag_dir / MARKER).read_text()).get("notes", {})


def find_latest(ckpt_dir: Path) -> str | None:
    """The tag the pointer names, or None when no save has completed."""
    pointer = ckpt_dir / POINTER
    if not pointer.is_file():
        return None
    return pointer.read_text().strip() or None


def load(engine: Any, ckpt_dir: Path, tag: str, identity: dict[str, Any], reshard: Any = None) -> dict[str, Any]:
    """Collective: restore model, optimizer, schedule and this rank's RNG; return the client state.
    A checkpoint of the same model written under another layout goes through `reshard(tag_dir)`."""
    info = verify(ckpt_dir / tag, {"model": identity["model"]})
    if info["identity"] != identity:
        if reshard is None or {identity["zero_stage"], info["identity"]["zero_stage"]} - {1, 2}:
            verify(ckpt_dir / tag, identity)  # raises, naming what differs
            raise CheckpointError(f"cannot reshard {ckpt_dir / tag}: only between ZeRO stages 1 and 2")
        log.info("resharding %s: written under %s, loading under %s", ckpt_dir / tag,
                 info["identity"]["layout"], identity["layout"])
        reshard(ckpt_dir / tag)
        return {k: v for k, v in safe_load(ckpt_dir / tag / "mp_rank_00_model_states.pt").items()
                if k in ("step", "tokens", "data", "config", "guard")}
    reader = engine.checkpoint_engine

    class SafeReads:  # DeepSpeed's reader, loading with safe_load
        def __getattr__(self, name: str) -> Any:
            return getattr(reader, name)

        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_load(path, map_location)

    engine.checkpoint_engine = SafeReads()
    try:
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    finally:
        engine.checkpoint_engine = reader
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt_dir / tag}: see the log above")
    rng = ckpt_dir / tag / f"rng_rank{dist.get_rank():05d}.pt"
    if rng.is_file():  # written under the same layout, so the same ranks exist
        _set_rng_state(safe_load(rng))
    return client_state


# Resharding. Besides DeepSpeed's files (exact, but only for the layout that wrote them), each
# checkpoint holds a layout-free copy of the training state: for every parameter, under its plain
# model name, the fp32 weight and the AdamW moments, gathered over data parallelism and split as
# tensor parallelism splits it (one file per tensor x pipeline rank, written by data-parallel rank 0).
# Another layout reads the shards it needs, joins them, and cuts its own. ZeRO 1 and 2 only.

UNIVERSAL = "universal"
MOMENTS = ("exp_avg", "exp_avg_sq")


def save_universal(engine: Any, tag_dir: Path, names: dict[int, str], tp_rank: int, pp_rank: int, dp_rank: int,
                   scheduler: dict[str, Any]) -> None:
    """Collective over data parallelism (the gathers); every rank calls after its DeepSpeed save."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    # DeepSpeed 0.19 links optimizer-state views right after the first param group's first step, so a
    # second group (our undecayed norms) stays unlinked: link again now that every group has state.
    engine.optimizer._hp_optimizer_states_linked = False
    engine.optimizer._lazy_init_hp_params_optimizer_state()
    shard = {}
    for p in engine.module.parameters():
        state = {"fp32": safe_get_full_fp32_param(p)}
        state.update({k: safe_get_full_optimizer_state(p, k) for k in MOMENTS})
        if any(v is None for v in state.values()):
            raise CheckpointError("layout-free state needs ZeRO stage 1 or 2 and one optimizer step")
        shard[names[id(p)]] = {k: v.detach().cpu() for k, v in state.items()} | {
            "dim": getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None}
    if dp_rank == 0:
        (tag_dir / UNIVERSAL).mkdir(exist_ok=True)
        torch.save({"params": shard, "scheduler": scheduler},
                   tag_dir / UNIVERSAL / f"tp{tp_rank:02d}_pp{pp_rank:02d}.pt")


def load_universal(engine: Any, tag_dir: Path, names: dict[int, str], tp_rank: int, tp: int, step: int,
                   vocab_size: int) -> None:
    """Set weights, moments, step and schedule of `engine` (any layout, ZeRO 1/2) from a checkpoint's
    layout-free copy. Collective-free: each rank reads files."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    by_name, scheduler = _read_universal(tag_dir)
    zero = engine.optimizer
    # DeepSpeed creates AdamW's state at the first step; create it now so it can be set. The fp32 partitions
    # AdamW steps: ZeRO-1/2's optimizer names them one way, BF16_Optimizer (bf16 under ZeRO-1) another.
    partitions = getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_groups_flat_partition
    for group in partitions:
        zero.optimizer.state[group] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(group),
                                       "exp_avg_sq": torch.zeros_like(group)}
    zero._lazy_init_hp_params_optimizer_state()
    for p in engine.module.parameters():
        name = names[id(p)]
        cut_dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) and tp > 1 else None
        vocab_rows = name.endswith(VOCAB_PARAMS)
        for key in ("fp32", *MOMENTS):
            full = _joined(by_name[name], key, vocab_size if vocab_rows else None)
            if cut_dim is not None:  # this rank's part, as tensor parallelism cut it (padded vocabulary included)
                full = Shard(tuple(full.shape), cut_dim, tp_rank, tp).cut(full)
            local = full.to(p.device)
            if key == "fp32":
                safe_set_full_fp32_param(p, local)
                p.data.copy_(local.to(p.dtype))
            else:
                safe_set_full_optimizer_state(p, local, key)
    engine.lr_scheduler.load_state_dict(scheduler)
    engine.lr_scheduler.step(engine.lr_scheduler.last_batch_iteration)  # loading sets the counter, this the lr


def _read_universal(tag_dir: Path) -> tuple[dict[str, list[tuple[int, dict]]], dict]:
    """Each parameter's saved shards as (tensor-parallel rank, state), and the LR schedule."""
    files = sorted((tag_dir / UNIVERSAL).glob("tp*_pp*.pt"))
    if not files:
        raise CheckpointError(f"{tag_dir} has no {UNIVERSAL}/ copy (written under ZeRO 1 or 2 only): it can be "
                              f"resumed only under the layout that wrote it")
    by_name: dict[str, list[tuple[int, dict]]] = {}
    scheduler: dict = {}
    for f in files:
        saved = safe_load(f)
        scheduler = saved["scheduler"]
        for name, state in saved["params"].items():
            by_name.setdefault(name, []).append((int(f.name[2:4]), state))
    return by_name, scheduler


def _joined(shards: list[tuple[int, dict]], key: str, vocab_size: int | None) -> torch.Tensor:
    """The whole tensor from its tensor-parallel shards, without vocabulary padding."""
    ordered = [state for _, state in sorted({rank: state for rank, state in shards}.items())]
    dim = ordered[0]["dim"]  # how the writing layout split it
    full = ordered[0][key] if dim is None else torch.cat([st[key] for st in ordered], dim=dim)
    return full[:vocab_size] if vocab_size is not None else full


def full_weights(tag_dir: Path, vocab_size: int, tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """The plain model's fp32 state dict from a checkpoint's layout-free copy, offline (no processes)."""
    by_name, _ = _read_universal(tag_dir)
    weights = {name: _joined(shards, "fp32", vocab_size if name.endswith(VOCAB_PARAMS) else None)
               for name, shards in by_name.items()}
    if tie_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return weights
