"""Real multi-process training through torchrun (gloo, CPU) and the `foundry train` CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import data_args, read_metrics, torchrun

STEPS = 8
COMMON = [
    "configs/models/tiny.yaml", "configs/quickstart.yaml",
    f"train.max_steps={STEPS}", "train.global_batch_size=8", "train.warmup_steps=2", "data.seq_len=64",
    "tracking.log_interval=1", "checkpoint.interval=4", "checkpoint.resume=true",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, stdlib_shards) -> dict[str, Path]:
    """One process with the whole batch, and two ZeRO-1 processes with half each (plus accumulation)."""
    root = tmp_path_factory.mktemp("runs")
    layouts = {
        "single": (1, ["train.micro_batch_size=8"]),
        "zero1_dp2": (2, ["train.micro_batch_size=2", "parallel.zero_stage=1"]),  # 2 ranks x 2 micro x accum 2
    }
    for name, (nproc, extra) in layouts.items():
        torchrun(nproc, [*COMMON, *data_args(stdlib_shards), *extra, f"train.run_dir={root / name}"])
    return {name: root / name for name in layouts}


def test_two_zero1_processes_match_one_process(runs):
    single, dp2 = read_metrics(runs["single"]), read_metrics(runs["zero1_dp2"])
    assert [m["step"] for m in single] == [m["step"] for m in dp2] == list(range(1, STEPS + 1))
    for a, b in zip(single, dp2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a, b)
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9)
    assert single[-1]["loss"] < single[0]["loss"] - 0.2, "loss did not fall"


def test_run_dir_holds_the_resolved_config(runs):
    saved = yaml.safe_load((runs["zero1_dp2"] / "config.yaml").read_text())
    assert saved["train"]["micro_batch_size"] == 2 and saved["parallel"]["zero_stage"] == 1
    assert "${" not in (runs["zero1_dp2"] / "config.yaml").read_text()  # interpolations resolved


def test_resume_continues_exactly(runs, stdlib_shards):
    run_dir = runs["zero1_dp2"]
    before = {m["step"]: m for m in read_metrics(run_dir)}
    (run_dir / "checkpoints" / "latest_complete").write_text("step00000004")  # as if it had died after step 4
    torchrun(2, [*COMMON, *data_args(stdlib_shards), "train.micro_batch_size=2", f"train.run_dir={run_dir}"])
    records = read_metrics(run_dir)  # the first run's records after step 4 are replaced, not repeated
    assert [m["step"] for m in records] == list(range(1, STEPS + 1))
    for m in records[4:]:  # bitwise: same data, same weights, same optimizer state, same RNG
        assert m["loss"] == before[m["step"]]["loss"] and m["grad_norm"] == before[m["step"]]["grad_norm"]
        assert m["lr"] == before[m["step"]]["lr"]
