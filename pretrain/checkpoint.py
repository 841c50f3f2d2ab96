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

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("foundry")

POINTER = "latest_complete"
MARKER = "COMPLETE.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as a whole; the message names the missing piece."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power cut
    finally:
        os.close(fd)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine: Any, ckpt_dir: Path, step: int, client_state: dict[str, Any], identity: dict[str, Any],
         keep: int) -> None:
    """Collective: every rank calls. `identity` (model config, layout) must match to load it again."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    rank = dist.get_rank()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), tag_dir / f"rng_rank{rank:05d}.pt")
    dist.barrier()  # every rank's files are written
    if rank == 0:
        files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*")) if p.is_file()}
        _write_atomic(tag_dir / MARKER, json.dumps({"step": step, "identity": identity, "files": files}, indent=1))
        _write_atomic(ckpt_dir / POINTER, tag)
        _prune(ckpt_dir, keep, newest=tag)
    dist.barrier()
    log.info("checkpoint %s saved (%d kept)", tag_dir, keep)


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


def find_latest(ckpt_dir: Path) -> str | None:
    """The tag the pointer names, or None when no save has completed."""
    pointer = ckpt_dir / POINTER
    if not pointer.is_file():
        return None
    return pointer.read_text().strip() or None


def load(engine: Any, ckpt_dir: Path, tag: str, identity: dict[str, Any]) -> dict[str, Any]:
    """Collective: restore model, optimizer, schedule and this rank's RNG; return the client state."""
    verify(ckpt_dir / tag, identity)
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt_dir / tag}: see the log above")
    rng = ckpt_dir / tag / f"rng_rank{dist.get_rank():05d}.pt"
    if rng.is_file():  # written under the same layout, so the same ranks exist
        _set_rng_state(torch.load(rng, weights_only=False))
    return client_state
