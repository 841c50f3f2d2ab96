"""The run's checkpoints: saved every `checkpoint.interval` steps and at the end, and resumed from.

A save holds the engine's state as each rank's DeepSpeed files (model, optimizer partition, LR
schedule, RNG: pretrain/checkpoint.py, written in the background), a record of what each rank's
files hold (so another layout can resume it: pretrain/reshard.py), the tokenizer (so that `foundry
generate` needs nothing else), and in its client state the step, the tokens seen, the resolved
config and the `state_dict()` of every component registered with the checkpointer (the data
position, the bad-step guard). A resume hands each component its state back through
`load_state_dict`: a new stateful component is one more entry in `components`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist

from foundry.data.tokenizer import TOKENIZER_FILE
from foundry.parallel.consolidate import full_state_dict
from foundry.pretrain import checkpoint, reshard
from foundry.pretrain.config import to_yaml

if TYPE_CHECKING:
    from foundry.pretrain.build import Run
    from foundry.pretrain.config import CheckpointConfig, ModelConfig

log = logging.getLogger("foundry")


class Stateful(Protocol):
    """A component that owns part of the run's state: saved in each checkpoint, handed back on resume."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Checkpointer:
    """Owns RUN_DIR/checkpoints: when to save, what a save holds, and the resume from the newest one."""

    def __init__(self, run: Run, checkpoint_cfg: CheckpointConfig, model: ModelConfig, zero_stage: int,
                 components: dict[str, Stateful] | None = None):
        """`run`'s engine and `components`' states, saved and resumed as `checkpoint_cfg` (the checkpoint section)
        says; `model` and `zero_stage` (with the layout): what a checkpoint must match to be loaded."""
        self.run, self.cfg, self.model, self.components = run, checkpoint_cfg, model, components or {}
        self.dir = run.run_dir / "checkpoints"
        self.config_yaml = to_yaml(run.cfg)  # recorded whole in each save, as config.yaml records it
        checkpoint.install(run.engine)
        # The background writes agree over a group of their own: gloo (host memory), never training's collectives.
        # A fast rank may wait there for a slow node's write while training goes on, which the watchdog does not time:
        # no timeout of its own (a week), or a slow write would fail a good save.
        self.group = dist.new_group(backend="gloo", timeout=timedelta(days=7))
        self.pending: checkpoint.BackgroundSave | None = None
        # What a checkpoint must match to be loaded exactly (as it reads back from JSON).
        self.identity = json.loads(json.dumps({"model": dataclasses.asdict(model),
                                               "layout": dataclasses.asdict(run.layout),
                                               "zero_stage": zero_stage}))
        self.resumed_from: Path | None = None

    def resume(self) -> int:
        """Load the newest complete checkpoint (with checkpoint.resume=true, when there is one) into the engine
        and the components; returns its step, 0 when the run starts fresh."""
        tag = checkpoint.choose(self.dir, self.group) if self.cfg.resume else None  # the newest that verifies
        if tag is None:
            return 0
        self.resumed_from = self.dir / tag
        client_state = self._load(self.resumed_from, checkpoint.read_marker(self.resumed_from))
        for key, component in self.components.items():
            if client_state.get(key) is not None:  # checkpoints from before a component existed lack its key
                component.load_state_dict(client_state[key])
        return client_state["step"]

    def load(self, tag_dir: Path) -> dict[str, Any]:
        """Verify a complete checkpoint (the ranks share the reading) and load it into the engine, whatever layout
        wrote it; returns its client state."""
        return self._load(tag_dir, checkpoint.verify_together(tag_dir, self.group))

    def _load(self, tag_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
        client_state = checkpoint.load(self.run.engine, tag_dir, info, self.identity, self._reshard)
        log.info("resumed from %s at step %d (%.1fM tokens seen)", tag_dir, client_state["step"],
                 client_state["tokens"] / 1e6)
        return client_state

    def due(self, step: int, last: bool) -> bool:
        return last or bool(self.cfg.interval) and step % self.cfg.interval == 0

    def save(self, step: int, notes: dict[str, Any]) -> None:
        """Every rank calls; returns once the state is copied to host memory, while a thread writes it. Rank 0's
        `notes` go into the checkpoint's marker, for a resume to read (e.g. the MLflow run it continues). The save
        before it is waited for first: a failed one raises SaveError on every rank here (or in `wait`) unless
        checkpoint.continue_on_save_error says to train on."""
        self.wait()
        client_state = {"step": step, "tokens": step * self.run.tokens_per_step,
                        **{key: component.state_dict() for key, component in self.components.items()},
                        "config": self.config_yaml}
        run = self.run
        record = {"rank": dist.get_rank(), "tp": run.topology.tp_rank, "pp": run.topology.pp_rank,
                  "dp": run.topology.dp_rank, **reshard.describe_rank(run.engine, run.plain_names)}
        extra = {}
        if dist.get_rank() == 0:
            tokenizer = run.datasets[0].tokenizer_file
            extra[TOKENIZER_FILE] = lambda path: shutil.copyfile(tokenizer, path)
        self.pending = checkpoint.save(run.engine, self.dir, step, client_state, self.identity, record, self.group,
                                       self.cfg.keep, extra, notes=notes or None)

    def wait(self) -> None:
        """Block until the save in flight (if any) is durable and marked complete; a failed one raises SaveError on
        every rank unless checkpoint.continue_on_save_error says to train on."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        try:
            pending.wait()
        except checkpoint.SaveError as e:
            if e.fatal or not self.cfg.continue_on_save_error:
                raise
            log.error("%s; training on (checkpoint.continue_on_save_error=true)", e.short)

    def save_consolidated(self) -> None:
        """The whole model as a plain fp32 state dict in RUN_DIR/model.pt (gathered on rank 0)."""
        run, model = self.run, self.model
        full = full_state_dict(run.engine.module, run.plain_names, run.topology, model.vocab_size, model.tie_embeddings)
        if dist.get_rank() == 0:
            path = run.run_dir / "model.pt"
            torch.save(full, path)
            log.info("wrote the unsharded fp32 model to %s", path)

    @property
    def writing(self) -> int | None:
        """The step whose checkpoint is being written in the background, if any."""
        return self.pending.step if self.pending else None

    def _reshard(self, tag_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
        run = self.run
        saved = reshard.load_resharded(run.engine, tag_dir, info, run.plain_names, run.topology.tp_rank,
                                       run.layout.tp, self.model.vocab_size)
        return {key: saved[key] for key in ("step", "tokens", "config", *self.components) if key in saved}
