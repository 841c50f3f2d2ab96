"""Fault injection on CPU with torchrun: bad steps are skipped, a frozen rank trips the hang watchdog (which times
saves and evaluations on their own limits), a save onto a full disk fails cleanly. (Kills and stop signals:
tests/test_launch.py.)"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from foundry.pretrain import watchdog
from foundry.pretrain.checkpoint import MARKER, POINTER, tag_for, verify
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


def _optimizer_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor in every rank's optimizer file (the fp32 weights and AdamW moments of its partition), by file
    and place in the file."""
    out: dict[str, torch.Tensor] = {}

    def walk(where: str, obj) -> None:
        if torch.is_tensor(obj):
            out[where] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{where}/{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{where}/{i}", v)

    for f in sorted(tag_dir.glob("*optim_states.pt")):
        walk(f.name, torch.load(f, weights_only=False)["optimizer_state_dict"])
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
    after3, after4, after5 = (_optimizer_state(ckpt / tag_for(s)) for s in (3, 4, 5))
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


# Saves that fail: the checkpoint directory is a real 6 MiB tmpfs, room for one checkpoint of this run (~4.2 MiB).

@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("mounting a small tmpfs needs root (CI runs as root): run the suite as root")
    mount = tmp_path / "run" / "checkpoints"
    mount.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(mount)], check=True)
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

    # Not allowed to go on (the default): the relaunch resumes from step 2, exactly, and stops when it learns that
    # the background write of step 4 failed: at the next save (step 6), before it begins.
    stopping = torchrun(2, args, check=False)
    assert stopping.returncode == 1
    assert f"foundry: run stopped: checkpoint {tag_for(4)} was not saved: rank " in stopping.stderr
    assert f"the previous checkpoint {tag_for(2)} is still the one a resume loads" in stopping.stderr
    assert f"resumed from {small_disk / tag_for(2)} at step 2" in stopping.stdout + stopping.stderr
    assert {m["step"]: m["loss"] for m in read_metrics(run_dir)} == first
    status = read_status(run_dir)
    assert status["state"] == "failed" and status["step"] == 6 and "MiB free there" in status["reason"]
    assert (small_disk / POINTER).read_text() == tag_for(2)
    verify(small_disk / tag_for(2), {})  # whole: every file it lists, at its recorded size


# Saves and evaluations: timed on their own limits (checkpoint.timeout_seconds, eval.timeout_seconds), not as steps.

def _watchdog(tmp_path: Path, timeout: float) -> watchdog.Watchdog:
    """Rank 0 of 1, with a store of its own and no process group."""
    return watchdog.Watchdog(dist.HashStore(), 0, 1, timeout, tmp_path / "rank0.log")


def test_a_save_is_timed_on_its_own_limit_and_the_next_step_gets_its_full_limit_after_it(tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(watchdog, "time", SimpleNamespace(monotonic=lambda: now[0], time=time.time))
    dog = _watchdog(tmp_path, timeout=8)
    dog.stop()  # no thread: the test reads the clock itself
    assert dog.clock is None  # start-up takes as long as it takes
    dog.beat(1)
    now[0] += 5
    with dog.busy("saving checkpoint step00000001", 30, "checkpoint.timeout_seconds"):
        now[0] += 29  # far past the step's 8 s
        assert not dog.clock.overdue(now[0])
        now[0] += 2
        assert dog.clock.overdue(now[0])
        assert dog.clock.describe(now[0]) == \
            "saving checkpoint step00000001 has run for 31 s (checkpoint.timeout_seconds=30)"
    now[0] += 7.9
    assert not dog.clock.overdue(now[0])  # 8 s from the end of the save, not from the last step
    now[0] += 0.2
    assert dog.clock.overdue(now[0])
    assert dog.clock.describe(now[0]) == "no step finished for 8 s (train.step_timeout_seconds=8)"
    with dog.busy("evaluation at step 1", 0, "eval.timeout_seconds"):
        assert not dog.clock.overdue(now[0] + 1e6)  # 0: no limit
    dog.stack_file.close()
    off = _watchdog(tmp_path, timeout=0)  # train.step_timeout_seconds=0: off, for saves and evaluations too
    off.beat(1)
    with off.busy("saving checkpoint step00000001", 1, "checkpoint.timeout_seconds"):
        assert off.clock is None


def test_the_watchdog_outlasts_a_step_limit_in_an_evaluation_and_ends_a_save_over_its_limit(tmp_path, monkeypatch,
                                                                                            caplog):
    exits = []
    dog = _watchdog(tmp_path, timeout=1)  # checks every 0.25 s
    monkeypatch.setattr(os, "_exit", lambda code: (exits.append(code), dog.stop()))
    dog.beat(3)
    with dog.busy("evaluation at step 3", 5, "eval.timeout_seconds"):
        time.sleep(1.5)  # past the step's limit
    assert not exits
    with caplog.at_level(logging.ERROR, logger="foundry"), \
            dog.busy("saving checkpoint step00000003", 0.5, "checkpoint.timeout_seconds"):
        deadline = time.monotonic() + 10
        while not exits and time.monotonic() < deadline:
            time.sleep(0.05)
    dog.stack_file.close()
    assert exits == [watchdog.EXIT_CODE]
    assert re.fullmatch(r"watchdog: saving checkpoint step00000003 has run for \d+ s "
                        r"\(checkpoint.timeout_seconds=0.5\) after step 3; no rank is silent or behind: .*; "
                        r"last steps: rank 0: step 3\. Stacks .*",
                        caplog.messages[-1]), caplog.messages
    assert "--- watchdog: Python stacks of rank 0 ---" in (tmp_path / "rank0.log").read_text()


def test_a_save_longer_than_a_step_finishes_and_one_over_its_own_limit_is_ended_naming_it(tmp_path, stdlib_shards):
    run_dir, slow = tmp_path / "run", {"FOUNDRY_SLOW_SAVE_SECONDS": "8"}  # each save takes 8 s more
    args = [*GUARDED, *data_args(stdlib_shards), "checkpoint.resume=true", "train.warmup_steps=1",
            "train.step_timeout_seconds=3", f"train.run_dir={run_dir}"]
    ckpt = run_dir / "checkpoints"
    torchrun(2, [*args, "train.max_steps=2", "checkpoint.timeout_seconds=30"], module="tests.slow_save", env=slow)
    assert (ckpt / POINTER).read_text() == tag_for(2) and (ckpt / tag_for(2) / MARKER).exists()

    ended = torchrun(2, [*args, "train.max_steps=4", "checkpoint.timeout_seconds=3"], module="tests.slow_save",
                     env=slow, check=False)
    logged = ended.stdout + ended.stderr
    assert f"resumed from {ckpt / tag_for(2)} at step 2" in logged, logged[-3000:]
    assert re.search(r"watchdog: \w+ checkpoint step00000004 has run for \d+ s \(checkpoint.timeout_seconds=3\) "
                     r"after step 4; ", logged), logged[-3000:]
    assert ended.returncode != 0 and re.search(r"exitcode\s*: 3 ", logged), logged[-3000:]
    assert (ckpt / POINTER).read_text() == tag_for(2)


def test_an_evaluation_over_its_limit_is_ended_by_the_watchdog_naming_it(tmp_path, stdlib_shards):
    proc = torchrun(2, [*GUARDED, *data_args(stdlib_shards), f"eval.datasets=[{stdlib_shards}]", "eval.tokens=256",
                        "eval.interval=2", "train.max_steps=4", "train.step_timeout_seconds=8",
                        "eval.timeout_seconds=2", f"train.run_dir={tmp_path / 'run'}"],
                    module="tests.slow_save", env={"FOUNDRY_SLOW_EVAL_SECONDS": "60"}, check=False)
    logged = proc.stdout + proc.stderr
    assert re.search(r"watchdog: evaluation at step 2 has run for \d+ s \(eval.timeout_seconds=2\) after step 2; ",
                     logged), logged[-3000:]
    assert proc.returncode != 0 and re.search(r"exitcode\s*: 3 ", logged), logged[-3000:]
