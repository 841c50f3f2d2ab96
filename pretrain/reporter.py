"""What a run reports: the console line of each logged step and of each evaluation, and what rank 0
records in `train.run_dir`: the resolved config (`config.yaml`), `metrics.jsonl`, `eval.jsonl`,
`status.json` (how the run ended, for the launchers: pretrain/stop.py) and the MLflow run
(pretrain/tracking.py), which each checkpoint names so that a resumed run continues it."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from foundry.pretrain.checkpoint import read_notes, tag_for, write_atomic
from foundry.pretrain.config import public, to_yaml
from foundry.pretrain.evaluate import report
from foundry.pretrain.flops import device_peak_flops
from foundry.pretrain.metrics import StepLogger, drop_records_after, duration
from foundry.pretrain.stop import write_status
from foundry.pretrain.tracking import Tracker, flatten, git_commit

if TYPE_CHECKING:
    from foundry.pretrain.build import Run
    from foundry.pretrain.config import TrackingConfig

log = logging.getLogger("foundry")


class Reporter:
    """Owns what the run tells: the console lines, and rank 0's files in RUN_DIR and its MLflow run."""

    def __init__(self, run: Run, tracking: TrackingConfig, max_steps: int, start_step: int,
                 resumed_from: Path | None, evaluates: bool):
        """`run`'s steps up to `max_steps`, reported as the `tracking` section says. `start_step`: the step the run
        resumes after (0: a fresh run), from the checkpoint `resumed_from`. A resumed run repeats the steps after
        its checkpoint, so their earlier records go. (The config is recorded whole: config.yaml, MLflow's params.)"""
        self.run, self.run_dir, self.start_step, self.max_steps = run, run.run_dir, start_step, max_steps
        self.first_rank = dist.get_rank() == 0
        self.tracker: Tracker | None = None
        if self.first_rank:
            config_yaml = to_yaml(run.cfg)
            # Atomically: under `foundry launch` every rank is reading this very file at start-up.
            write_atomic(self.run_dir / "config.yaml", config_yaml)
            log.info("resolved config: %s | logs of every rank: %s", self.run_dir / "config.yaml", self.run_dir / "logs")
            if tracking.mlflow:
                self.tracker = self._start_tracking(tracking, resumed_from, config_yaml)
            if evaluates:
                drop_records_after(self.run_dir / "eval.jsonl", start_step)
            write_status(self.run_dir, "running", start_step, max_steps)
        self.metrics = StepLogger(
            self.run_dir / "metrics.jsonl" if self.first_rank else None, start_step=start_step, max_steps=max_steps,
            interval=tracking.log_interval, tokens_per_step=run.tokens_per_step, flops_per_token=run.flops_per_token,
            peak_flops=device_peak_flops(run.device), devices=dist.get_world_size(), device=run.device)
        self.started = time.perf_counter()

    def step(self, step: int, loss: torch.Tensor, skipped: int, last: bool) -> None:
        """Step `step` is done (`skipped`: the run's skipped steps so far; `last`: this process's last step)."""
        record = self.metrics.step(step, loss, self.run.engine, skipped=skipped, last=last)
        if self.tracker and record:
            self.tracker.log(record)

    def evaluated(self, step: int, results: dict[str, dict[str, float]]) -> None:
        report(step, results, self.run_dir / "eval.jsonl" if self.first_rank else None)
        if self.tracker:
            self.tracker.log_values(step, {f"val_{key}/{name}": r[key] for name, r in results.items()
                                           for key in ("loss", "ppl")})

    def notes(self) -> dict[str, Any]:
        """What a checkpoint's marker records for a resume: the MLflow run it continues."""
        return {"mlflow_run_id": self.tracker.run_id} if self.tracker else {}

    def failed(self, step: int, reason: str) -> None:
        """The run stopped for a reason a relaunch would meet again (so the launchers do not relaunch it)."""
        if self.first_rank:
            write_status(self.run_dir, "failed", step, self.max_steps, reason=reason)
        self.crashed()

    def crashed(self) -> None:
        """The run ends with an error; status.json still says running, so a launcher relaunches it."""
        if self.tracker:
            self.tracker.close("FAILED")

    def finished(self, step: int, stopped_by: str | None) -> None:
        """The run trained to train.max_steps, or was stopped by signal `stopped_by` after step `step`."""
        if stopped_by:
            log.info("stopped by %s after step %d of %d; the run resumes from %s", stopped_by, step, self.max_steps,
                     self.run_dir / "checkpoints" / tag_for(step))
        first, last = self.metrics.first, self.metrics.last
        if first is not None:
            log.info("%s: steps %d-%d in %s | loss %.4f -> %.4f", "stopped" if stopped_by else "done",
                     self.start_step + 1, step, duration(time.perf_counter() - self.started), first["loss"],
                     last["loss"])
        if self.first_rank:
            write_status(self.run_dir, "stopped" if stopped_by else "finished", step, self.max_steps, stopped_by)
        if self.tracker:
            self.tracker.close("KILLED" if stopped_by else "FINISHED")

    def _start_tracking(self, tracking: TrackingConfig, resumed_from: Path | None, config_yaml: str) -> Tracker:
        """The run's MLflow run: the one the checkpoint it resumes from names, else a new one. Its params and
        artifact are the whole config."""
        run, cfg = self.run, self.run.cfg
        run_id = read_notes(resumed_from).get("mlflow_run_id") if resumed_from else None
        tags = {
            "git.commit": git_commit(), "layout": str(run.layout), "zero_stage": str(cfg.parallel.zero_stage),
            "world_size": str(dist.get_world_size()), "precision": run.precision, "kernel.attention": run.attention,
            "device": torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu",
            "slurm.job_id": os.environ.get("SLURM_JOB_ID", "none"),
        }
        return Tracker(tracking, self.run_dir, run_id=run_id, params=flatten(dataclasses.asdict(public(cfg))),
                       tags=tags, config_yaml=config_yaml)
