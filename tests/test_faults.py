"""Fault injection on CPU with torchrun: bad steps are skipped, a frozen rank trips the hang watchdog, a save
onto a full disk fails cleanly. (Kills and stop signals: tests/test_launch.py.)"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from foundry.pretrain.checkpoint import POINTER, tag_for, verify
from foundry.pretrain.stop import read_status
from tests.conftest import data_args, read_metrics, torchrun
from tests.test_launch import TINY, _Launcher, _workers


def test_a_frozen_rank_trips_the_watchdog_which_names_it_within_the_limit(tmp_path, stdlib_shards):
    run_dir = tmp_path / "run"
    launcher = _Launcher([*TINY, *data_args(stdlib_shards), "train.max_steps=400", "train.step_timeout_seconds=8", "launch.grace_seconds=10",
                          "data.workers=0", f"train.run_dir={run_dir}"])
    frozen = None
    try:
        launcher.wait_for_step(5, timeout=180)
        frozen = _workers(run_dir)[1]
        os.kill(frozen, signal.SIGSTOP)  # as a hung node: alive, silent, holding its peers in a collective
        stopped_at = time.time()
        out = launcher.wait(timeout=180)
    finally:
        if frozen:
            try:
                os.kill(frozen, signal.SIGCONT)
            except ProcessLookupError:
                pass
        launcher.proc.kill()
    assert launcher.proc.returncode != 0, out[-2000:]
    fired = launcher.first("watchdog: no step finished") - stopped_at
    assert 6 <= fired < 8 + 10, f"the watchdog fired {fired:.1f} s after the rank froze (limit 8 s)"
    line = next(line for _, line in launcher.output.lines if "watchdog: no step finished" in line)
    assert "blame rank 1 (node " in line and "rank 1: step" in line and "not answering" in line, line
    assert "--- watchdog: Python stacks of rank 0 ---" in (run_dir / "logs" / "rank0.log").read_text()


# Bad steps: NaNs and loss spikes injected by tests/inject_faults.py into otherwise unchanged training.

GUARDED = [
    "configs/models/tiny.yaml", "configs/quickstart.yaml", "train.global_batch_size=8", "train.micro_batch_size=2",
    "train.warmup_steps=2", "data.seq_len=64", "tracking.log_interval=1", "checkpoint.resume=false",
]


def _inject(nproc: int, args: list[str], rank: int, steps: str, scale: str | None = None):
    env = {"FOUNDRY_NAN_RANK": str(rank), "FOUNDRY_NAN_STEPS": steps, **({"FOUNDRY_FAULT_SCALE": scale} if scale else {})}
    return torchrun(nproc, args, module="tests.inject_faults", check=False, env=env)


def _universal(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Every weight and AdamW moment in a checkpoint's layout-free copy, by name."""
    out = {}
    for f in sorted((tag_dir / "universal").glob("*.pt")):
        for name, state in torch.load(f, weights_only=False)["params"].items():
            out.update({f"{f.name}:{name}:{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return out


def test_a_nan_on_one_rank_skips_the_step_on_all_with_no_update_and_the_run_finishes(tmp_path, stdlib_shards):
    run_dir = tmp_path / "run"
    proc = _inject(2, [*GUARDED, *data_args(stdlib_shards), "train.max_steps=6", "checkpoint.interval=1",
                       "checkpoint.keep=10", f"train.run_dir={run_dir}"], rank=1, steps="4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = {r["step"]: r for r in read_metrics(run_dir)}
    assert sorted(m) == [1, 2, 3, 4, 5, 6]
    assert math.isnan(m[4]["loss"]) and m[4]["grad_norm"] == float("inf")
    assert all(math.isfinite(m[s]["loss"]) for s in (1, 2, 3, 5, 6))
    assert [m[s]["skipped_steps"] for s in (3, 4, 6)] == [0, 1, 1]
    assert m[4]["lr"] == m[3]["lr"] != m[5]["lr"]  # the schedule waits for the step that was not applied
    # No update: weights and moments after step 4 are those after step 3, bit for bit; step 5 moves them.
    ckpt = run_dir / "checkpoints"
    after3, after4, after5 = (_universal(ckpt / tag_for(s)) for s in (3, 4, 5))
    assert after3.keys() == after4.keys() and all(torch.equal(after3[k], after4[k]) for k in after3)
    assert not all(torch.equal(after4[k], after5[k]) for k in after4)
    logged = proc.stdout + proc.stderr
    assert "skipped step 4 (no update)" in logged and "global batch 4 of the data order" in logged
    assert "tokens 1536-2047 of the run" in logged  # 8 sequences x 64 tokens per step


def test_a_loss_spike_is_skipped_under_pipeline_parallelism(tmp_path, stdlib_shards):
    run_dir = tmp_path / "run"
    proc = _inject(2, [*GUARDED, *data_args(stdlib_shards), "parallel.pipeline=2", "train.max_steps=7",
                       "train.spike_window=3", "train.spike_factor=2", f"train.run_dir={run_dir}"],
                   rank=1, steps="6", scale="30")  # the last stage's logits x30: a large but finite loss
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = {r["step"]: r for r in read_metrics(run_dir)}
    assert [m[s]["skipped_steps"] for s in range(1, 8)] == [0, 0, 0, 0, 0, 1, 1]
    assert m[6]["lr"] == m[5]["lr"]
    assert "or a loss was above the spike limit" in proc.stdout + proc.stderr


def test_too_many_bad_steps_in_a_row_save_and_stop_with_a_clear_message(tmp_path, stdlib_shards):
    run_dir = tmp_path / "run"
    # ZeRO-0: DeepSpeed steps the plain torch optimizer, which the guard gives its non-finite check.
    proc = _inject(1, [*GUARDED, *data_args(stdlib_shards), "parallel.zero_stage=0", "train.max_steps=20",
                       "train.max_skipped_in_row=3", f"train.run_dir={run_dir}"], rank=0, steps="3-20")
    assert proc.returncode != 0
    assert "foundry: run stopped: 3 steps in a row were skipped (the last, step 5, had loss nan)" in proc.stderr
    status = read_status(run_dir)
    assert status["state"] == "failed" and status["step"] == 5 and "3 steps in a row" in status["reason"]
    assert (run_dir / "checkpoints" / POINTER).read_text() == tag_for(5)
    weights = torch.load(run_dir / "checkpoints" / tag_for(5) / "mp_rank_00_model_states.pt", weights_only=False)
    assert all(torch.isfinite(w).all() for w in weights["module"].values())
    assert weights["guard"]["in_row"] == 3 and len(weights["guard"]["recent"]) == 2


# Saves that fail: the checkpoint directory is a real 11 MiB tmpfs, room for one checkpoint of this run (~7 MiB).

@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("mounting a small tmpfs needs root (CI runs as root): run the suite as root")
    mount = tmp_path / "run" / "checkpoints"
    mount.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=11m,mode=0700", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_save_onto_a_full_disk_fails_cleanly_and_the_previous_checkpoint_still_loads(small_disk, stdlib_shards):
    run_dir = small_disk.parent
    args = [*GUARDED, *data_args(stdlib_shards), "train.max_steps=6", "checkpoint.interval=2", "checkpoint.resume=true",
            f"train.run_dir={run_dir}"]
    # Allowed to go on: step 2 is saved, steps 4 and 6 do not fit; the run finishes all its steps.
    going_on = torchrun(2, [*args, "checkpoint.continue_on_save_error=true"])
    logged = going_on.stdout + going_on.stderr
    for tag in (tag_for(4), tag_for(6)):
        assert re.search(rf"checkpoint {tag} was not saved: rank \d: writing {small_disk / tag}/\S+: .* MiB free", logged)
    assert "training on (checkpoint.continue_on_save_error=true)" in logged
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 7))
    assert [p.name for p in small_disk.glob("step*")] == [tag_for(2)]  # no partial save
    assert not list(small_disk.rglob("*.tmp"))
    first = {m["step"]: m["loss"] for m in read_metrics(run_dir)}

    # Not allowed to go on (the default): the relaunch resumes from step 2, exactly, then stops at the failed save.
    stopping = torchrun(2, args, check=False)
    assert stopping.returncode == 1
    assert f"foundry: run stopped: checkpoint {tag_for(4)} was not saved: rank " in stopping.stderr
    assert f"the previous checkpoint {tag_for(2)} is still the one a resume loads" in stopping.stderr
    assert f"resumed from {small_disk / tag_for(2)} at step 2" in stopping.stdout + stopping.stderr
    assert {m["step"]: m["loss"] for m in read_metrics(run_dir)} == {s: first[s] for s in (1, 2, 3, 4)}
    status = read_status(run_dir)
    assert status["state"] == "failed" and status["step"] == 4 and "MiB free there" in status["reason"]
    assert (small_disk / POINTER).read_text() == tag_for(2)
    verify(small_disk / tag_for(2), {})  # whole: every file it lists, at its recorded size
