"""Shared helpers: tiny configs and a torchrun launcher that runs the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from foundry.pretrain.config import ModelConfig, load_model_config

REPO = Path(__file__).resolve().parents[1]


def preset(name: str) -> ModelConfig:
    """A model preset of configs/models by name, e.g. "llama3-8b"."""
    return load_model_config(f"configs/models/{name}.yaml")


@pytest.fixture
def tiny() -> ModelConfig:
    return ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       ffn_hidden_size=128, max_seq_len=64)


@pytest.fixture(scope="session")
def stdlib_shards(tmp_path_factory) -> Path:
    """A few stdlib packages prepared into small shards with a 512-token BPE (the tiny preset's vocabulary)."""
    from foundry.data.prepare import PrepareOptions, prepare

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("stdlib_shards")
    inputs = [str(stdlib / pkg) for pkg in ("json", "email", "logging", "concurrent", "importlib")]
    prepare(inputs, PrepareOptions(out=out, pattern="**/*.py", vocab_size=512, sample_tokens=512,
                                   shard_tokens=20_000, workers=2, on_error="skip"))
    return out


def data_args(shards: Path) -> list[str]:
    """Overrides that point a run at `shards`, with one loader worker per rank, and no validation (the
    quickstart's validation set is prepared by launch/quickstart.sh; tests/test_eval.py has its own)."""
    return [f"data.datasets=[{{path: {shards}}}]", "data.streams=4", "eval.datasets=[]"]


def torchrun(nproc: int, args: list[str], timeout: float = 300, module: str = "foundry.launch.cli", check: bool = True,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m MODULE train ARGS` in the repo; raises on failure if `check`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    if not any(a.startswith("tracking.mlflow=") for a in args):
        args = [*args, "tracking.mlflow=false"]  # MLflow has its own tests; elsewhere it only costs CPU time
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, "train", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


class Output:
    """A child's output, read line by line on a thread as it comes, each line stamped with the time it arrived:
    a test waits for the line that tells it what it waits for, rather than sleeping and looking."""

    def __init__(self, stream: IO[str]):
        self.lines: list[tuple[float, str]] = []
        self._ended = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.lines.append((time.time(), line))
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def _first(self, text: str) -> float | None:
        return next((at for at, line in self.lines if text in line), None)

    def wait_for(self, text: str, timeout: float) -> float:
        """When the first line holding `text` arrived, waiting up to `timeout` s for it; fails if the output
        ends (the child exited) or the time runs out first."""
        with self._changed:
            self._changed.wait_for(lambda: self._ended or self._first(text) is not None, timeout)
            at = self._first(text)
        if at is None:
            why = "the output ended" if self._ended else f"{timeout:.0f} s passed"
            raise AssertionError(f"{why} without a line holding {text!r}:\n{self.text()[-3000:]}")
        return at

    def close(self, timeout: float = 10) -> str:
        """All of it, once the child has exited (its end of the pipe closed)."""
        self._reader.join(timeout)
        return self.text()

    def text(self) -> str:
        return "".join(line for _, line in self.lines)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> Path:
    """A SLURM controller and node daemon on localhost (see tests/slurm_cluster.py); returns slurm.conf.
    SLURM_CONF points every SLURM command of the session at it."""
    from tests import slurm_cluster

    conf, pids = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    yield conf
    subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True)
    slurm_cluster.stop(pids)
    if previous is None:
        os.environ.pop("SLURM_CONF")
    else:
        os.environ["SLURM_CONF"] = previous


def foundry(args: list[str], timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """`foundry ARGS` in the repo (not raising on failure)."""
    return subprocess.run([sys.executable, "-m", "foundry.launch.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **popen.pop("env", {})}, **popen)


@pytest.fixture(scope="session")
def val_shards(stdlib_shards, tmp_path_factory) -> Path:
    """A validation set prepared like the training data, with its tokenizer, from other files (xml, csv)."""
    from foundry.data.prepare import PrepareOptions, prepare

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("val_shards")
    prepare([str(stdlib / "xml"), str(stdlib / "csv.py")],
            PrepareOptions(out=out, tokenizer=str(stdlib_shards / "tokenizer.json"), pattern="**/*.py",
                           sample_tokens=512, shard_tokens=20_000, workers=2, on_error="skip"))
    return out
