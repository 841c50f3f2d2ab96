"""MLflow tracking: one MLflow run per training run, written by rank 0 from a background thread.

- The run is created on the first start with the flattened resolved config as parameters, tags
  (git commit, layout, kernel paths, world size, SLURM job id) and the config as an artifact. Its
  id goes into every checkpoint, so a resumed, relaunched or requeued run continues the same
  MLflow run and its curves have no seam.
- The store is `tracking.uri`; by default SQLite in the run directory (`RUN_DIR/mlflow.db`,
  artifacts in `RUN_DIR/mlartifacts`), which needs no server: `mlflow ui --backend-store-uri
  sqlite:///RUN_DIR/mlflow.db` shows it.
- Training never waits for it and never fails because of it: calls run on a sender thread, in
  order. While the store cannot be reached the points wait in memory (they are in metrics.jsonl
  too), one warning says so, and they are sent with their original timestamps once it answers.
  At the end the run waits up to `tracking.flush_seconds` for the last ones.
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import threading
import time
import urllib.parse
from collections import deque
from pathlib import Path
from typing import Any

from foundry.pretrain.config import REDACTED, TrackingConfig, first_line

log = logging.getLogger("foundry")

# Metric names in MLflow for the keys of a metrics.jsonl record (pretrain/metrics.py).
METRICS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gib", "tokens", "skipped_steps")


def credentials_to_env(uri: str | None) -> str | None:
    """`uri` without user and password; a password in it (not the *** of a saved config) moves into
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, where MLflow's client reads it and which child
    processes (torchrun's workers, a SLURM job) inherit, so no file has to hold it."""
    if not uri:
        return uri
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None:
        return uri
    if parts.password not in (None, REDACTED):
        os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(parts.username)
        os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def default_uri(run_dir: Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{'train': {'lr': 3e-4}} -> {'train.lr': '0.0003'}: one MLflow parameter per config key."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def git_commit() -> str:
    """The code's git commit, '+dirty' when it has uncommitted changes; 'unknown' outside a checkout."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


class Tracker:
    """The MLflow run of this training run (rank 0 only)."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path, *, run_id: str | None, params: dict[str, str],
                 tags: dict[str, str], config_yaml: str):
        self.cfg, self.run_dir, self.run_id = cfg, Path(run_dir), run_id
        self.uri = credentials_to_env(cfg.uri) or default_uri(run_dir)
        # Each operation can be retried as a whole until it succeeds.
        first = [("create", tags), ("params", params)] if run_id is None else [("resume", tags)]
        self._ops: deque[tuple[str, Any]] = deque([*first, ("artifact", config_yaml)])
        self._cond = threading.Condition()
        self._closed = False
        self._down_since: float | None = None
        self._thread = threading.Thread(target=self._send_forever, name="mlflow-sender", daemon=True)
        self._thread.start()

    def log(self, record: dict[str, Any]) -> None:
        """Queue one metrics.jsonl record (its step and values) with the time it was taken."""
        self.log_values(record["step"], {k: record[k] for k in METRICS if record.get(k) is not None})

    def log_values(self, step: int, values: dict[str, float]) -> None:
        """Queue metrics of `step` by name (e.g. "val_loss/stdlib")."""
        self._put("metrics", (step, int(time.time() * 1000), {k: float(v) for k, v in values.items()}))

    def close(self, status: str) -> None:
        """End the run (FINISHED, KILLED or FAILED) and wait up to tracking.flush_seconds for every point to go."""
        self._put("end", status)
        deadline = time.monotonic() + self.cfg.flush_seconds
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            while self._ops and time.monotonic() < deadline:
                self._cond.wait(timeout=0.5)
            left = sum(1 for op, _ in self._ops if op == "metrics")
        if left:
            log.warning("MLflow at %s did not answer for %.0f s: %d logged steps were not sent (they are in %s)",
                        self.uri, self.cfg.flush_seconds, left, self.run_dir / "metrics.jsonl")

    def _put(self, op: str, payload: Any) -> None:
        with self._cond:
            self._ops.append((op, payload))
            self._cond.notify_all()

    def _send_forever(self) -> None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # we retry, without blocking anyone
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient  # ~3 s to import: off the training thread

        for name in ("mlflow", "alembic"):  # their INFO lines (database migrations) are not the run's news
            logging.getLogger(name).setLevel(logging.WARNING)

        client = None
        while True:
            with self._cond:
                while not self._ops:
                    if self._closed:
                        return
                    self._cond.wait()
                op, payload = self._ops[0]
                # Consecutive metric points go in one request; other operations keep their place in the order.
                batch = [p for _, p in itertools.takewhile(lambda o: o[0] == "metrics", itertools.islice(
                    self._ops, 200))] if op == "metrics" else None
            try:
                client = client or MlflowClient(tracking_uri=self.uri)
                self._send(client, op, batch if batch is not None else payload)
            except Exception as e:  # noqa: BLE001 - any failure of the store must leave training running
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning("MLflow at %s cannot be reached (%s); training goes on, and the metrics are kept "
                                "and sent when it answers", self.uri, first_line(e)[:200])
                time.sleep(2.0)
                continue
            if self._down_since is not None:
                log.info("MLflow at %s answers again after %.0f s: sending what waited", self.uri,
                         time.monotonic() - self._down_since)
                self._down_since = None
            with self._cond:
                for _ in range(len(batch) if batch is not None else 1):
                    self._ops.popleft()
                self._cond.notify_all()

    def _send(self, client: Any, op: str, payload: Any) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if op == "create":
            experiment = client.get_experiment_by_name(self.cfg.experiment)
            if experiment is None:
                # A local store keeps its artifacts next to it; a server decides for itself.
                location = (self.run_dir.resolve() / "mlartifacts").as_uri() if not self.cfg.uri else None
                experiment_id = client.create_experiment(self.cfg.experiment, artifact_location=location)
            else:
                experiment_id = experiment.experiment_id
            run = client.create_run(experiment_id, run_name=self.cfg.run_name or self.run_dir.name, tags=payload)
            self.run_id = run.info.run_id
            log.info("MLflow run %s (%s) in %s", self.run_id, run.info.run_name, self.uri)
        elif op == "resume":  # a resumed run continues its MLflow run; the parameters stay as first logged
            client.update_run(self.run_id, status="RUNNING")
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in payload.items()])
            log.info("MLflow run %s continues in %s", self.run_id, self.uri)
        elif op == "params":
            items = [Param(k, v[:6000]) for k, v in payload.items()]
            for i in range(0, len(items), 100):  # MLflow's limit per batch
                client.log_batch(self.run_id, params=items[i:i + 100])
        elif op == "artifact":
            client.log_text(self.run_id, payload, "config.yaml")
        elif op == "metrics":
            metrics = [Metric(key, value, ts, step) for step, ts, values in payload for key, value in values.items()]
            for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
                client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        elif op == "end":
            client.set_terminated(self.run_id, status=payload)
