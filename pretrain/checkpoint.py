"""Checkpoints that never load half, written once per rank in the background.

A checkpoint is the directory `checkpoints/step00000100/` holding DeepSpeed's own files, each written
once by the rank that owns its state (the ZeRO partition of the optimizer on every rank, the model and
LR schedule on data-parallel rank 0 of each model-parallel rank, the pipeline's layers), one RNG file
per rank, and the tokenizer. Nothing is gathered across ranks to save.

A save has two halves. On the training thread, DeepSpeed's `save_checkpoint` hands every file's state
to `HostCopies`, which copies its tensors to host memory (pinned, on a GPU) and returns: training
stalls only for that copy. On a thread of its own, `BackgroundSave` then writes the files, fsyncs them
and their directories, and records each file's size and CRC-32 as read back from disk. The ranks then
compare notes over a process group of their own (gloo, so it never competes with training's), and only
when every rank's files are durable does rank 0 write `COMPLETE.json` (every file with its size and
checksum, the model and layout, what each rank's files hold) and then atomically replace the pointer
`checkpoints/latest_complete`. A crash or kill at any moment before that leaves the previous pointer,
and thus the previous checkpoint, as the one that loads; a directory without its marker is never loaded.

Resuming verifies before it loads: the ranks share out the listed files, each reads its share back
against the recorded checksums, and a checkpoint that fails is set aside (renamed `.rejected`, never
deleted) with one line naming the file, and the next older complete one is tried. Only the newest
`keep` complete checkpoints are kept.
"""

from __future__ import annotations

import collections
import copy
import json
import logging
import os
import pickle
import random
import re
import shutil
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from foundry.pretrain.config import first_line

log = logging.getLogger("foundry")

POINTER = "latest_complete"
MARKER = "COMPLETE.json"
REJECTED = ".rejected"  # suffix of a checkpoint set aside because it failed verification
FORMAT = 2  # COMPLETE.json with checksums and per-rank records; format 1 (sizes only) still loads unresharded
TAG = re.compile(r"step\d{8}")
# The file in which DeepSpeed keeps the model-parallel rank's client state and LR schedule (ZeRO-3 names it per rank).
MODEL_STATES = re.compile(r"(zero_pp_rank_\d+_)?mp_rank_\d+_model_states\.pt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as a whole; the message names the missing piece. `damaged`: its files
    are missing or differ from what was written (a resume sets it aside and falls back), rather than unreadable
    now (a resume stops: a file system's passing trouble must not discard a good checkpoint)."""

    def __init__(self, message: str, damaged: bool = False):
        super().__init__(message)
        self.damaged = damaged


class SaveError(RuntimeError):
    """A save that failed on some rank (disk full, no permission); the previous checkpoint is untouched. `short`:
    what failed, without the advice; `fatal`: the ranks could not agree (a peer is gone), so no setting trains on."""

    def __init__(self, short: str, advice: str = "", fatal: bool = False):
        super().__init__(short + advice)
        self.short, self.fatal = short, fatal


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
    fsync_dir(path.parent)  # the rename itself survives a power cut


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checksum(path: Path) -> tuple[int, int]:
    """(size, CRC-32) of the file as read back."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return size, crc


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


def install(engine: Any) -> HostCopies:
    """Make `engine` save through `HostCopies` and load through `safe_load`, for the rest of its life."""
    engine.checkpoint_engine = HostCopies()
    # DeepSpeed copies its zero_to_fp32.py into each checkpoint, on rank 0, outside the checkpoint engine (a write
    # that could fail on one rank mid-save); it reads data-parallel layouts only, `foundry convert export` any.
    engine._copy_recovery_script = lambda path: None
    return engine.checkpoint_engine


class HostCopies:
    """DeepSpeed's checkpoint engine for this project (its `CheckpointEngine` interface, whole): `save` copies the
    state to host memory and keeps it with its path for `BackgroundSave` to write; `load` reads with `safe_load`.
    DeepSpeed passes live tensors (ZeRO's fp32 partition and moments) that training goes on changing, so the copy
    is what is written."""

    name = "foundry.HostCopies"

    def __init__(self):
        self.staged: list[tuple[Path, Any]] = []

    def preserves_storage_sharing(self) -> bool:
        return False  # we copy every tensor ourselves: DeepSpeed need not clone some of them first

    def save(self, state_dict: Any, path: str) -> None:
        self.staged.append((Path(path), _to_host(state_dict, {})))

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError:
            pass  # the write into it fails in the background and is reported with its reason

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location)

    # The rest of the interface: no commit protocol of DeepSpeed's; BackgroundSave seals the checkpoint.
    def create(self, info: Any) -> None: ...

    def commit(self, info: Any) -> bool:
        return True

    def is_data_parallel_writer(self, dp_rank: int) -> bool:
        return dp_rank == 0  # never asked: DeepSpeed decides this at initialisation, before `install`

    def is_decoupled(self) -> bool:
        return False

    def set_commit_info(self, info: Any) -> None: ...

    def get_commit_info(self) -> None:
        return None

    def cleanup(self) -> None: ...

    def take(self) -> list[tuple[Path, Any]]:
        staged, self.staged = self.staged, []
        return staged


def _to_host(obj: Any, memo: dict) -> Any:
    """`obj` with every tensor copied to host memory (compact: a view into a flat buffer copies only itself);
    everything else deep-copied, since DeepSpeed hands over live objects too."""
    if torch.is_tensor(obj):
        t = obj.detach()
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.device)  # one copy of a tensor named twice
        if key not in memo:
            if t.device.type == "cpu":
                memo[key] = t.clone()
            else:  # pinned, so the copy runs at full bus speed; `save` waits for it once, at the end
                memo[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
        return memo[key]
    if isinstance(obj, dict):
        items = [(k, _to_host(v, memo)) for k, v in obj.items()]
        return type(obj)(items) if type(obj) in (dict, collections.OrderedDict) else dict(items)
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(_to_host(v, memo) for v in obj)
    return copy.deepcopy(obj)


def save(engine: Any, ckpt_dir: Path, step: int, client_state: dict[str, Any], identity: dict[str, Any],
         record: dict[str, Any], group: Any, keep: int, extra: dict[str, Callable[[Path], None]] | None = None,
         notes: dict[str, Any] | None = None) -> BackgroundSave:
    """Collective: every rank calls. Copies this rank's state to host memory and returns the `BackgroundSave` that
    writes and seals it. `identity` (model config, layout) must match to load it exactly; `record` says what this
    rank's files hold (for resharding); `extra` maps more file names to functions writing them (this rank's);
    rank 0's `notes` go into the marker, readable before any engine exists (`read_notes`); `group` is the process
    group the background thread agrees over."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    started = time.monotonic()
    if dist.get_rank() == 0:
        # A run that started over may be saving into an old run's directory of this step: its marker must not
        # vouch for the files now being replaced. DeepSpeed's save begins with a barrier, so no rank writes before.
        (tag_dir / MARKER).unlink(missing_ok=True)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    writes = [(path, lambda p, state=state: torch.save(state, p)) for path, state in engine.checkpoint_engine.take()]
    writes.append((tag_dir / f"rng_rank{dist.get_rank():05d}.pt", lambda p, state=_rng_state(): torch.save(state, p)))
    writes += [(tag_dir / name, write) for name, write in (extra or {}).items()]
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the pinned copies are done before the thread reads them
    pending = BackgroundSave(tag_dir, step, writes, identity, record, notes or {}, group, keep, started)
    log.info("checkpoint %s: state copied to host memory in %.2f s; writing in the background", tag,
             time.monotonic() - started)
    return pending


class BackgroundSave:
    """One save's writes on this rank, done on a thread: write, fsync, checksum, then (a collective over `group`)
    agree with every rank that all files are durable; rank 0 then writes the marker and the pointer. A write that
    fails on any rank (disk full, no permission) fails the save on every rank: the partial directory is removed and
    `wait` raises SaveError; the pointer still names the previous checkpoint."""

    def __init__(self, tag_dir: Path, step: int, writes: list[tuple[Path, Callable[[Path], None]]],
                 identity: dict[str, Any], record: dict[str, Any], notes: dict[str, Any], group: Any, keep: int,
                 started: float):
        self.tag_dir, self.step, self.writes, self.identity, self.record = tag_dir, step, writes, identity, record
        self.notes, self.group, self.keep = notes, group, keep
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.error: SaveError | None = None
        self.started = started  # when the save began, host copy included
        self.thread = threading.Thread(target=self._run, name=f"foundry-save-{tag_dir.name}", daemon=True)
        self.thread.start()

    def wait(self) -> None:
        """Block until this save is sealed (or failed: SaveError)."""
        self.thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            files, problem = self._write()
            self._seal(files, problem)
        except Exception as e:  # noqa: BLE001 - only the collectives raise here: a peer is gone
            self.error = SaveError(f"checkpoint {self.tag_dir.name} was not saved: the ranks could not agree on it "
                                   f"({type(e).__name__}: {first_line(e)})", fatal=True)
        finally:
            self.writes = []  # frees the host copies

    def _write(self) -> tuple[dict[str, list[int]], str | None]:
        """Write this rank's files durably; their [size, crc32] by path in the checkpoint, or the first problem."""
        files: dict[str, list[int]] = {}
        for path, write in self.writes:
            try:
                write(path)
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
                files[str(path.relative_to(self.tag_dir))] = list(checksum(path))
            except Exception as e:  # noqa: BLE001 - any failure must reach _seal, or the other ranks wait there for ever
                return files, f"writing {path}: {type(e).__name__}: {first_line(e)} ({_free(path)} there)"
        try:
            for d in {path.parent for path, _ in self.writes} | {self.tag_dir.parent}:
                fsync_dir(d)  # the files' names survive a power cut too
        except OSError as e:
            return files, f"syncing {self.tag_dir}: {first_line(e)}"
        return files, None

    def _seal(self, files: dict[str, list[int]], problem: str | None) -> None:
        """Collective over `group`: every rank's files are durable, then rank 0 writes marker and pointer."""
        mine = {"problem": problem, **self.record, "files": sorted(files), "sizes": files}
        ranks: list[dict[str, Any] | None] = [None] * self.world
        dist.all_gather_object(ranks, mine, group=self.group)
        problems = [(r, rec["problem"]) for r, rec in enumerate(ranks) if rec["problem"]]
        if not problems and self.rank == 0:
            problems = self._mark(ranks)
        verdict = [problems]
        dist.broadcast_object_list(verdict, src=0, group=self.group)  # rank 0's marker or pointer may have failed
        if verdict[0]:
            if self.rank == 0:
                shutil.rmtree(self.tag_dir, ignore_errors=True)  # frees what it took: the disk may be the full one
            rank, first = verdict[0][0]
            previous = find_latest(self.tag_dir.parent)
            self.error = SaveError(
                f"checkpoint {self.tag_dir.name} was not saved: rank {rank}: {first}; "
                f"{'the previous checkpoint ' + previous if previous else 'no earlier checkpoint'} is still the one a "
                f"resume loads", f"; free space or fix permissions in {self.tag_dir.parent}, or set "
                f"checkpoint.continue_on_save_error=true to train on without saving")
            return
        if self.rank == 0:  # sealed: nothing below may fail the save on one rank only
            total = sum(size for rec in ranks for size, _ in rec["sizes"].values())
            log.info("checkpoint %s saved: %d files, %.1f MiB, durable %.1f s after the save began (%d kept)",
                     self.tag_dir, sum(len(rec["files"]) for rec in ranks), total / 2**20,
                     time.monotonic() - self.started, self.keep)
            try:
                _prune(self.tag_dir.parent, self.keep, newest=self.tag_dir.name)
            except OSError as e:
                log.warning("could not remove old checkpoints in %s: %s", self.tag_dir.parent, first_line(e))

    def _mark(self, ranks: list[dict[str, Any]]) -> list[tuple[int, str]]:
        """Rank 0: the marker (every rank's files, sizes, checksums and records), then the pointer."""
        files = {name: sizes for rec in ranks for name, sizes in rec["sizes"].items()}
        records = [{k: v for k, v in rec.items() if k not in ("problem", "sizes")} for rec in ranks]
        marker = {"format": FORMAT, "step": self.step, "identity": self.identity, "notes": self.notes,
                  "files": files, "ranks": records}
        try:
            write_atomic(self.tag_dir / MARKER, json.dumps(marker, indent=1))
            write_atomic(self.tag_dir.parent / POINTER, self.tag_dir.name)
        except Exception as e:  # noqa: BLE001 - every rank waits for this verdict: it must be sent
            return [(0, f"writing {self.tag_dir / MARKER}: {type(e).__name__}: {first_line(e)}")]
        return []


def _free(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path.parent if path.parent.exists() else path.parent.parent).free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"


def _prune(ckpt_dir: Path, keep: int, newest: str) -> None:
    """Delete all but the newest `keep` complete checkpoints, and partial ones older than `newest` (abandoned).
    Set-aside (`.rejected`) directories are left for a person to look at."""
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG.fullmatch(p.name))
    # Newer complete ones never load (a resume stops at the pointer): counting them could delete the one that does.
    complete = [t for t in tags if t <= newest and (ckpt_dir / t / MARKER).is_file()]
    keep_tags = set(complete[-keep:]) | {newest}
    for t in tags:
        if t not in keep_tags and t < newest:  # partial saves newer than the pointer may be in flight elsewhere
            (ckpt_dir / t / MARKER).unlink(missing_ok=True)  # first: a crash part-way leaves an unmarked directory
            shutil.rmtree(ckpt_dir / t, ignore_errors=True)


def read_marker(tag_dir: Path) -> dict[str, Any]:
    """The marker of a complete checkpoint; CheckpointError when its save did not finish."""
    marker = tag_dir / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{tag_dir} has no {MARKER}: its save did not finish; it cannot be loaded "
                              f"(resume from an older checkpoint or start fresh)")
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{marker} cannot be read ({first_line(e)}): resume from another checkpoint") from None


DAMAGED = ": the checkpoint is damaged; restore the file or resume from another checkpoint"


def damage(tag_dir: Path, info: dict[str, Any], share: tuple[int, int] = (0, 1)) -> str | None:
    """What is wrong with the files the marker `info` lists (see DAMAGED for the fix), None when nothing: each must be
    there with its recorded size and checksum. `share` (i, n): only every n-th file from the i-th, so that n ranks check one together."""
    for name in sorted(info["files"])[share[0]::share[1]]:
        recorded = info["files"][name]
        size, crc = (recorded, None) if isinstance(recorded, int) else recorded  # format 1 recorded sizes only
        path = tag_dir / name
        if not path.is_file():
            return f"checkpoint {tag_dir} is missing {name}"
        found = checksum(path) if crc is not None else (path.stat().st_size, None)  # OSError: unreadable, not damaged
        if found[0] != size:
            return f"checkpoint {tag_dir}: {name} has {found[0]} bytes, {size} were written"
        if found[1] != crc:
            return f"checkpoint {tag_dir}: {name} fails its checksum (CRC-32 {found[1]:08x}, {crc:08x} was written)"
    return None


def check_identity(tag_dir: Path, info: dict[str, Any], identity: dict[str, Any]) -> None:
    for key, expected in identity.items():
        if info["identity"].get(key) != expected:
            raise CheckpointError(f"checkpoint {tag_dir} was written for {key}={info['identity'].get(key)}, "
                                  f"this run has {key}={expected}: use the same {key} to resume it")


def verify(tag_dir: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """Offline, one process: the marker of a complete, undamaged checkpoint written for `identity`; CheckpointError
    otherwise, naming the missing piece."""
    info = read_marker(tag_dir)
    problem = damage(tag_dir, info)
    if problem:
        raise CheckpointError(problem + DAMAGED, damaged=True)
    check_identity(tag_dir, info, identity)
    return info


def verify_together(tag_dir: Path, group: Any) -> dict[str, Any]:
    """Collective over `group`: the marker of a complete checkpoint whose files are whole, the reading shared out
    among its ranks (the model and layout are `load`'s to check); CheckpointError otherwise, on every rank."""
    world = dist.get_world_size(group)
    try:
        info = read_marker(tag_dir)
        mine = (damage(tag_dir, info, (dist.get_rank(group), world)), True)
    except (CheckpointError, OSError) as e:  # sent all the same: every rank must reach the all_gather
        info, mine = {}, (f"{tag_dir}: {first_line(e)}", False)
    problems: list[tuple[str | None, bool] | None] = [None] * world
    dist.all_gather_object(problems, mine, group=group)
    unreadable = next((p for p, readable in problems if not readable), None)
    if unreadable:
        raise CheckpointError(f"{unreadable}: cannot be read now; fix the file system and resume again")
    problem = next((p for p, _ in problems if p), None)
    if problem:
        raise CheckpointError(problem + DAMAGED, damaged=True)
    return info


def choose(ckpt_dir: Path, group: Any) -> str | None:
    """Collective over `group`: the newest complete checkpoint whose files are all whole (the ranks share the
    reading), None when no save has completed. One that fails is set aside with one line naming what is wrong, and
    the next older one tried; when none passes, CheckpointError."""
    # Rank 0 lists them for all: file systems shared by many nodes may show each node a different listing for a while.
    tags = [complete_tags(ckpt_dir) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(tags, src=0, group=group)
    for tag in tags[0]:
        try:
            verify_together(ckpt_dir / tag, group)
        except CheckpointError as e:
            if not e.damaged:
                raise
            if dist.get_rank() == 0:
                aside = _set_aside(ckpt_dir / tag)
                log.error("%s; set aside as %s, falling back to the checkpoint before it", str(e).removesuffix(DAMAGED),
                          aside.name)
            dist.barrier(group=group)  # renamed before any rank looks for the next one
            continue
        if dist.get_rank() == 0 and find_latest(ckpt_dir) != tag:
            write_atomic(ckpt_dir / POINTER, tag)  # the pointer names a checkpoint that loads
        return tag
    if find_latest(ckpt_dir) is None:
        return None
    raise CheckpointError(f"no checkpoint in {ckpt_dir} passes verification (the damaged ones are set aside as "
                          f"*{REJECTED}): restore one, or start afresh with checkpoint.resume=false")


def complete_tags(ckpt_dir: Path) -> list[str]:
    """The complete checkpoints a resume may load, newest first: those with a marker, up to the pointer's (newer ones
    belong to a save that never reached the pointer, or to another run that used this directory)."""
    latest = find_latest(ckpt_dir)
    if latest is None:
        return []
    return sorted((p.name for p in ckpt_dir.iterdir()
                   if TAG.fullmatch(p.name) and p.name <= latest and (p / MARKER).is_file()), reverse=True)


def _set_aside(tag_dir: Path) -> Path:
    aside = tag_dir.with_name(tag_dir.name + REJECTED)
    if aside.exists():
        aside = tag_dir.with_name(f"{tag_dir.name}{REJECTED}-{int(time.time())}")
    tag_dir.rename(aside)
    return aside


def read_notes(tag_dir: Path) -> dict[str, Any]:
    """The `notes` a complete checkpoint was saved with (e.g. the MLflow run it continues)."""
    return read_marker(tag_dir).get("notes", {})


def find_latest(ckpt_dir: Path) -> str | None:
    """The tag the pointer names, or None when no save has completed."""
    pointer = ckpt_dir / POINTER
    if not pointer.is_file():
        return None
    return pointer.read_text().strip() or None


def load(engine: Any, tag_dir: Path, info: dict[str, Any], identity: dict[str, Any],
         reshard: Callable[[Path, dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Collective: restore model, optimizer, schedule and this rank's RNG from the verified checkpoint `tag_dir`
    (marker `info`); return the client state. A checkpoint of the same model written under another layout or ZeRO
    stage goes through `reshard(tag_dir, info)`, which reads the per-rank files it needs, re-cuts them, and returns
    the client state."""
    check_identity(tag_dir, info, {"model": identity["model"]})
    if info["identity"] != identity:
        if "ranks" not in info:
            check_identity(tag_dir, info, identity)  # raises, naming what differs
        log.info("resharding %s: written under %s ZeRO-%s, loading under %s ZeRO-%s", tag_dir,
                 info["identity"]["layout"], info["identity"]["zero_stage"], identity["layout"], identity["zero_stage"])
        return reshard(tag_dir, info)
    path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {tag_dir}: see the log above")
    rng = tag_dir / f"rng_rank{dist.get_rank():05d}.pt"
    if rng.is_file():  # written under the same layout, so the same ranks exist
        _set_rng_state(safe_load(rng))
    return client_state

