"""Checkpoints: exact resume under several layouts, and no half-written checkpoint ever loads."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from foundry.pretrain.checkpoint import MARKER, POINTER, CheckpointError, tag_for, verify
from tests.conftest import REPO, Output, data_args, read_metrics, torchrun
from tests.pause_mid_save import PAUSED

STEPS = 10
COMMON = [
    "configs/models/tiny.yaml", "configs/quickstart.yaml", f"train.max_steps={STEPS}", "train.global_batch_size=8",
    "train.micro_batch_size=2", "train.warmup_steps=2", "data.seq_len=64", "tracking.log_interval=1",
    "checkpoint.interval=5", "checkpoint.resume=true",
]


@pytest.mark.parametrize("nproc, layout", [(1, []), (2, ["parallel.tensor=2"]), (2, ["parallel.pipeline=2"])],
                         ids=["single", "tp2", "pp2"])
def test_stop_and_resume_gives_bitwise_identical_losses(tmp_path, stdlib_shards, nproc, layout):
    args = [*COMMON, *data_args(stdlib_shards), *layout, f"train.run_dir={tmp_path}"]
    torchrun(nproc, args)
    straight = {m["step"]: m for m in read_metrics(tmp_path)}
    (tmp_path / "checkpoints" / POINTER).write_text(tag_for(5))  # as if the run had stopped after step 5
    torchrun(nproc, args)
    records = read_metrics(tmp_path)  # the first run's records of steps 6-10 are replaced, not repeated
    assert [m["step"] for m in records] == list(range(1, STEPS + 1))
    for m in records[5:]:
        assert (m["loss"], m["grad_norm"], m["lr"]) == tuple(straight[m["step"]][k] for k in ("loss", "grad_norm", "lr"))


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, stdlib_shards) -> Path:
    """A run saving at every step, SIGKILLed while the save of step 5 is half-written (tests/pause_mid_save.py
    holds it there and says so): steps 1-4 saved whole, the newest three of them kept."""
    run_dir = tmp_path_factory.mktemp("killed")
    cmd = [sys.executable, "-m", "tests.pause_mid_save", "train", *COMMON, *data_args(stdlib_shards),
           "train.max_steps=400", "tracking.mlflow=false", "checkpoint.interval=1", "data.workers=0",
           f"train.run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "FOUNDRY_PAUSE_SAVE_STEP": "5"},
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = Output(proc.stdout)
    try:
        output.wait_for(f"{PAUSED} 5", timeout=240)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        output.close()
    return run_dir


def test_a_save_killed_part_way_leaves_the_previous_checkpoint(killed_run, stdlib_shards):
    ckpt = killed_run / "checkpoints"
    pointer = (ckpt / POINTER).read_text().strip()
    verify(ckpt / pointer, {})  # every file it lists is there, whole
    partial = [d for d in ckpt.glob("step*") if not (d / MARKER).exists()]
    assert pointer == tag_for(4) and [d.name for d in partial] == [tag_for(5)]
    with pytest.raises(CheckpointError, match="did not finish"):
        verify(partial[0], {})
    # The run resumes from the pointer's checkpoint and goes on.
    step = int(pointer.removeprefix("step"))
    out = torchrun(1, [*COMMON, *data_args(stdlib_shards), f"train.max_steps={step + 2}", "data.workers=0",
                       f"train.run_dir={killed_run}"])
    assert f"resumed from {ckpt / pointer} at step {step}" in out.stderr + out.stdout
    assert read_metrics(killed_run)[-1]["step"] == step + 2


def test_damaged_or_foreign_checkpoints_are_refused_with_the_missing_piece(killed_run, tmp_path):
    ckpt = killed_run / "checkpoints"
    tag_dir = ckpt / (ckpt / POINTER).read_text().strip()
    info = json.loads((tag_dir / MARKER).read_text())
    identity = info["identity"]
    verify(tag_dir, identity)

    foreign = {**identity, "model": {**identity["model"], "num_layers": 2}}
    with pytest.raises(CheckpointError, match="was written for model="):
        verify(tag_dir, foreign)
    layout = {**identity, "layout": {"tp": 2, "pp": 1, "dp": 1}}
    with pytest.raises(CheckpointError, match="use the same layout"):
        verify(tag_dir, layout)

    model_file = next(name for name in info["files"] if "model_states" in name)
    with open(tag_dir / model_file, "r+b") as f:
        f.truncate(info["files"][model_file] // 2)
    with pytest.raises(CheckpointError, match=f"{model_file} has .* bytes"):
        verify(tag_dir, identity)
    (tag_dir / model_file).unlink()
    with pytest.raises(CheckpointError, match=f"missing {model_file}"):
        verify(tag_dir, identity)


def test_only_the_newest_complete_checkpoints_are_kept(killed_run):
    complete = sorted(d.name for d in (killed_run / "checkpoints").glob("step*") if (d / MARKER).exists())
    assert len(complete) == 3  # of the four or more saved whole


def test_a_tp2_dp2_checkpoint_resumes_under_other_layouts(tmp_path, stdlib_shards):
    """Resharding through the checkpoint's layout-free copy: (tp,pp,dp) = (2,1,2) -> (1,2,2) and (1,1,1)."""
    common = [*COMMON, *data_args(stdlib_shards)]
    torchrun(4, [*common, "parallel.tensor=2", f"train.run_dir={tmp_path / 'straight'}"])
    straight = {m["step"]: m for m in read_metrics(tmp_path / "straight")}
    for nproc, layout in ((4, ["parallel.pipeline=2"]), (1, [])):
        run = tmp_path / f"resharded{nproc}"
        (run / "checkpoints").mkdir(parents=True)
        shutil.copytree(tmp_path / "straight" / "checkpoints" / tag_for(5), run / "checkpoints" / tag_for(5))
        (run / "checkpoints" / POINTER).write_text(tag_for(5))
        out = torchrun(nproc, [*common, *layout, f"train.run_dir={run}"])
        assert "resharding" in out.stderr + out.stdout
        resumed = read_metrics(run)
        assert [m["step"] for m in resumed] == list(range(6, STEPS + 1))
        for m in resumed:
            assert m["loss"] == pytest.approx(straight[m["step"]]["loss"], rel=1e-4), (layout, m)


def test_a_bf16_checkpoint_resumes_under_another_layout(tmp_path, stdlib_shards):
    """bf16 under ZeRO-1 runs DeepSpeed's BF16_Optimizer (fp32 gradient sums), whose fp32 partitions the
    layout-free copy is loaded into: dp 2 -> one process. bf16 is emulated on the CPU; the sums' order changes
    with dp, so losses agree to bf16's precision, not bitwise."""
    common = [*COMMON, *data_args(stdlib_shards), "train.precision=bf16"]
    torchrun(2, [*common, f"train.run_dir={tmp_path / 'straight'}"])
    straight = {m["step"]: m for m in read_metrics(tmp_path / "straight")}
    run = tmp_path / "resharded"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / tag_for(5), run / "checkpoints" / tag_for(5))
    (run / "checkpoints" / POINTER).write_text(tag_for(5))
    out = torchrun(1, [*common, f"train.run_dir={run}"])
    assert "resharding" in out.stderr + out.stdout
    resumed = read_metrics(run)
    assert [m["step"] for m in resumed] == list(range(6, STEPS + 1))
    for m in resumed:
        assert m["loss"] == pytest.approx(straight[m["step"]]["loss"], rel=2e-2), m


def test_resharding_from_zero_3_is_refused(tmp_path):
    from foundry.pretrain.checkpoint import load

    tag_dir = tmp_path / tag_for(5)
    tag_dir.mkdir()
    written = {"model": {"a": 1}, "layout": {"tp": 2, "pp": 1, "dp": 2}, "zero_stage": 3}
    (tag_dir / MARKER).write_text(json.dumps({"step": 5, "identity": written, "files": {}}))
    wanted = {**written, "layout": {"tp": 1, "pp": 1, "dp": 1}}
    with pytest.raises(CheckpointError, match="use the same layout"):
        load(None, tmp_path, tag_for(5), wanted, reshard=lambda d: None)
