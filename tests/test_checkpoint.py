"""Checkpoints: exact resume under several layouts, and no half-written checkpoint ever loads."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from foundry.pretrain.checkpoint import DAMAGED, MARKER, POINTER, REJECTED, CheckpointError, checksum, tag_for, verify
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

    assert info["format"] == 2
    model_file = next(name for name in info["files"] if "model_states" in name)
    size, crc = info["files"][model_file]  # as read back when written
    assert size == (tag_dir / model_file).stat().st_size and crc == checksum(tag_dir / model_file)[1]
    flip_middle_byte(tag_dir / model_file)
    with pytest.raises(CheckpointError, match=f"{model_file} fails its checksum .*{re.escape(DAMAGED)}$"):
        verify(tag_dir, identity)
    with open(tag_dir / model_file, "r+b") as f:
        f.truncate(size // 2)
    truncated = f"{model_file} has {size // 2} bytes, {size} were written{re.escape(DAMAGED)}$"
    with pytest.raises(CheckpointError, match=truncated):
        verify(tag_dir, identity)
    (tag_dir / model_file).unlink()
    with pytest.raises(CheckpointError, match=f"missing {model_file}{re.escape(DAMAGED)}$"):
        verify(tag_dir, identity)


def test_only_the_newest_complete_checkpoints_are_kept(killed_run):
    complete = sorted(d.name for d in (killed_run / "checkpoints").glob("step*") if (d / MARKER).exists())
    assert len(complete) == 3  # of the four or more saved whole


def test_a_tp2_dp2_checkpoint_resumes_under_other_layouts(tmp_path, stdlib_shards):
    """Resharding from the checkpoint's per-rank files: (tp,pp,dp) = (2,1,2) -> (1,2,2) and (1,1,1)."""
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
    """bf16 under ZeRO-1 runs DeepSpeed's BF16_Optimizer (fp32 gradient sums), whose files are read and whose fp32
    partitions are loaded into: dp 2 -> one process. bf16 is emulated on the CPU; the sums' order changes
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


# Asynchronous saves under faults. A 2-process run (ZeRO-1, dp 2) saving at every step, as the reference run does
# uninterrupted; tests/pause_mid_save.py holds a save at a chosen point, and the test then kills one rank there, or
# looks at what a resume would find at that moment.
FAULT_STEPS = 7


def fault_args(shards: Path, run_dir: Path, *more: str) -> list[str]:
    return [*COMMON, *data_args(shards), f"train.max_steps={FAULT_STEPS}", "checkpoint.interval=1", "data.workers=0",
            *more, f"train.run_dir={run_dir}"]


def flip_middle_byte(path: Path) -> None:
    """One byte of `path` changed, its size kept: what a bad disk or a bad copy does."""
    with open(path, "r+b") as f:
        middle = f.seek(0, os.SEEK_END) // 2
        f.seek(middle)
        byte = f.read(1)[0]
        f.seek(middle)
        f.write(bytes([byte ^ 0xFF]))


class Paused:
    """`torchrun -m tests.pause_mid_save train ARGS` on `nproc` processes, its output read as it comes: `at(step,
    point)` waits until a save is held there and returns the pid and rank of the process held."""

    def __init__(self, nproc: int, args: list[str], env: dict[str, str]):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "tests.pause_mid_save", "train", *args, "tracking.mlflow=false"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.output = Output(self.proc.stdout)

    def at(self, step: int, point: str, timeout: float = 240) -> tuple[int, int]:
        self.output.wait_for(f"{PAUSED} {step} at {point}:", timeout)
        line = next(line for line in self.output.text().splitlines() if f"{PAUSED} {step} at {point}:" in line)
        found = re.search(r"pid (\d+) rank (\d+)", line)
        return int(found.group(1)), int(found.group(2))

    def wait(self, timeout: float) -> int | None:
        """The launcher's exit status once it has ended by itself, None if it has not within `timeout` s."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> str:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of the job (its own session)
        except ProcessLookupError:
            pass
        self.proc.wait()
        return self.output.close()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, stdlib_shards) -> tuple[Path, dict[int, tuple]]:
    """The reference: the fault tests' run, uninterrupted. Its run directory (checkpoints of steps 5-7 kept) and
    (loss, grad_norm, lr) by step."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    torchrun(2, fault_args(stdlib_shards, run_dir))
    return run_dir, {m["step"]: losses(m) for m in read_metrics(run_dir)}


def losses(m: dict) -> tuple:
    return m["loss"], m["grad_norm"], m["lr"]


def loadable(ckpt: Path) -> str:
    """The tag a resume would load now, checked as a resume checks it (the pointer's checkpoint, complete and whole)."""
    tag = (ckpt / POINTER).read_text().strip()
    verify(ckpt / tag, {})
    return tag


# Three points of the save (before, during and after its write, before the marker); the marker-before-pointer case
# is test_keep_counts_only_checkpoints_a_resume_can_load's (a resume never goes past the pointer).
@pytest.mark.parametrize("point, rank", [("write", 1), ("file", 1), ("seal", 1)],
                         ids=["before-write", "mid-write", "written-before-agreeing"])
def test_one_rank_killed_in_a_save_resumes_from_the_previous_checkpoint_bitwise(tmp_path, stdlib_shards, uninterrupted,
                                                                                 point, rank):
    """kill -9 of one rank (not the job) while the background save of step 5 is at `point` on that rank: the job
    ends by itself, step 4 is the checkpoint that loads, and the relaunch gives the uninterrupted run's losses."""
    args = fault_args(stdlib_shards, tmp_path)
    job = Paused(2, args, {"FOUNDRY_PAUSE_SAVE_STEP": "5", "FOUNDRY_PAUSE_AT": point, "FOUNDRY_PAUSE_RANK": str(rank)})
    try:
        pid, paused_rank = job.at(5, point)
        assert paused_rank == rank
        os.kill(pid, signal.SIGKILL)
        ended = job.wait(timeout=90)  # the other rank's collectives fail and torchrun ends the job
    finally:
        output = job.close()
    assert ended not in (None, 0), f"the job went on after rank {rank} was killed ({ended}):\n{output[-3000:]}"

    ckpt = tmp_path / "checkpoints"
    assert loadable(ckpt) == tag_for(4)  # every file it lists is there, whole
    assert (ckpt / tag_for(5) / MARKER).exists() == (point == "pointer")  # never loaded: newer than the pointer
    out = torchrun(2, args)
    assert f"resumed from {ckpt / tag_for(4)} at step 4" in out.stderr + out.stdout
    records = read_metrics(tmp_path)  # the killed run's records of steps 5-6 are replaced, not repeated
    assert [m["step"] for m in records] == list(range(1, FAULT_STEPS + 1))
    straight = uninterrupted[1]
    assert {m["step"]: losses(m) for m in records[4:]} == {step: straight[step] for step in range(5, FAULT_STEPS + 1)}
    assert loadable(ckpt) == tag_for(FAULT_STEPS)


def damaged_copy(reference: Path, run_dir: Path) -> tuple[Path, Path]:
    """`run_dir` holding the reference's checkpoints of steps 5 and 6, the pointer at 6, and one byte in the middle
    of rank 1's optimizer partition of step 6 changed (its size kept); the checkpoints and the damaged file."""
    ckpt = run_dir / "checkpoints"
    ckpt.mkdir(parents=True)
    for step in (5, 6):
        shutil.copytree(reference / "checkpoints" / tag_for(step), ckpt / tag_for(step))
    (ckpt / POINTER).write_text(tag_for(6))
    damaged = ckpt / tag_for(6) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    flip_middle_byte(damaged)
    return ckpt, damaged


def test_a_checkpoint_with_one_byte_changed_is_set_aside_and_the_previous_one_resumes_bitwise(tmp_path, stdlib_shards,
                                                                                              uninterrupted):
    reference, straight = uninterrupted
    ckpt, damaged = damaged_copy(reference, tmp_path)
    size = damaged.stat().st_size
    release = tmp_path / "release"
    # Held before the first save after the resume writes anything, to see what the resume left.
    job = Paused(2, fault_args(stdlib_shards, tmp_path),
                 {"FOUNDRY_PAUSE_SAVE_STEP": "6", "FOUNDRY_PAUSE_AT": "write", "FOUNDRY_PAUSE_RANK": "0",
                  "FOUNDRY_PAUSE_RELEASE": str(release)})
    try:
        job.at(6, "write")
        said = [line for line in job.output.text().splitlines() if "set aside as" in line]
        assert len(said) == 1, job.output.text()[-3000:]
        assert (f"checkpoint {ckpt / tag_for(6)}: {damaged.name} fails its checksum" in said[0]
                and f"set aside as {tag_for(6)}{REJECTED}, falling back" in said[0]), said[0]
        assert (ckpt / POINTER).read_text().strip() == tag_for(5)
        aside = ckpt / f"{tag_for(6)}{REJECTED}"  # kept for a person to look at, damaged file and all
        assert (aside / MARKER).is_file() and (aside / damaged.name).stat().st_size == size
        with pytest.raises(CheckpointError, match=f"{damaged.name} fails its checksum"):
            verify(aside, {})
        assert loadable(ckpt) == tag_for(5)
        release.touch()
        ended = job.wait(timeout=240)
    finally:
        output = job.close()
    assert ended == 0, output[-4000:]
    assert f"resumed from {ckpt / tag_for(5)} at step 5" in output
    resumed = read_metrics(tmp_path)
    assert [m["step"] for m in resumed] == [6, 7]
    assert {m["step"]: losses(m) for m in resumed} == {6: straight[6], 7: straight[7]}
    assert loadable(ckpt) == tag_for(7) and (ckpt / f"{tag_for(6)}{REJECTED}").is_dir()


def test_keep_1_after_a_fallback_never_leaves_no_loadable_checkpoint(tmp_path, stdlib_shards, uninterrupted):
    """checkpoint.keep=1 and the newest checkpoint damaged: the resume falls back to step 5, and at every moment of the
    saves after it that a crash could stop (before the write, before the marker, between marker and pointer, after
    the prune) the pointer names a checkpoint that loads; step 5 goes only once step 6 is sealed."""
    reference, straight = uninterrupted
    ckpt, _ = damaged_copy(reference, tmp_path)
    release = tmp_path / "release"
    job = Paused(2, fault_args(stdlib_shards, tmp_path, "checkpoint.keep=1"),
                 {"FOUNDRY_PAUSE_SAVE_STEP": "6,7", "FOUNDRY_PAUSE_AT": "write,mark,pointer", "FOUNDRY_PAUSE_RANK": "0",
                  "FOUNDRY_PAUSE_RELEASE": str(release)})
    seen = []
    try:
        for step in (6, 7):
            for point in ("write", "mark", "pointer"):
                job.at(step, point)
                tags = sorted(d.name for d in ckpt.iterdir() if d.is_dir())
                seen.append((step, point, loadable(ckpt), tags))
                release.touch()
        ended = job.wait(timeout=240)
    finally:
        output = job.close()
    assert ended == 0, output[-4000:]
    rejected = f"{tag_for(6)}{REJECTED}"
    assert seen == [
        (6, "write", tag_for(5), [tag_for(5), tag_for(6), rejected]),
        (6, "mark", tag_for(5), [tag_for(5), tag_for(6), rejected]),
        (6, "pointer", tag_for(5), [tag_for(5), tag_for(6), rejected]),
        (7, "write", tag_for(6), [tag_for(6), rejected, tag_for(7)]),  # step 5 pruned only after 6 was sealed
        (7, "mark", tag_for(6), [tag_for(6), rejected, tag_for(7)]),
        (7, "pointer", tag_for(6), [tag_for(6), rejected, tag_for(7)]),
    ]
    assert loadable(ckpt) == tag_for(7)
    assert sorted(d.name for d in ckpt.iterdir() if d.is_dir()) == [rejected, tag_for(7)]
    assert {m["step"]: losses(m) for m in read_metrics(tmp_path)} == {6: straight[6], 7: straight[7]}


def test_keep_counts_only_checkpoints_a_resume_can_load(tmp_path):
    """keep=2; step 5 has its marker but the pointer never reached it (the save was killed between the two), step 4
    was damaged and set aside, the resume fell back to step 3, and the run has just sealed step 4 again. Step 5 is not
    loadable (newer than the pointer): the two checkpoints a resume can load, 3 and 4, are the ones to keep."""
    from foundry.pretrain.checkpoint import _prune, complete_tags

    for step in (3, 4, 5):
        (tmp_path / tag_for(step)).mkdir()
        (tmp_path / tag_for(step) / MARKER).write_text("{}")
    (tmp_path / tag_for(4)).rename(tmp_path / f"{tag_for(4)}{REJECTED}")  # as the resume set it aside
    (tmp_path / tag_for(4)).mkdir()  # the run's save of step 4, sealed
    (tmp_path / tag_for(4) / MARKER).write_text("{}")
    (tmp_path / POINTER).write_text(tag_for(4))
    _prune(tmp_path, keep=2, newest=tag_for(4))
    assert complete_tags(tmp_path) == [tag_for(4), tag_for(3)]
