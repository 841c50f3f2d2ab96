"""`foundry launch`: torchrun on one or several nodes with relaunch, and SLURM batch jobs against a real
controller and node daemon on localhost (tests/slurm_cluster.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from foundry.data.stream import windows_taken
from foundry.launch.slurm import render_script
from foundry.pretrain.config import load_config
from foundry.pretrain.stop import read_status
from tests.conftest import REPO, Output, data_args, foundry, read_metrics
from tests.slurm_cluster import job_ended, scontrol_job, wait_until

TINY = [
    "configs/models/tiny.yaml", "configs/quickstart.yaml", "train.global_batch_size=16", "train.micro_batch_size=8",
    "train.warmup_steps=5", "data.seq_len=128", "tracking.log_interval=1", "checkpoint.resume=true",
    "launch.procs_per_node=2", "tracking.mlflow=false",
]


def _steps_in(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"\] step (\d+)/\d+ \|", log)]


def _losses_in(log: str) -> dict[int, str]:
    return {int(n): loss for n, loss in re.findall(r"\] step (\d+)/\d+ \| loss (\S+) ", log)}


def _logged_steps(run_dir: Path) -> int:
    return len(read_metrics(run_dir)) if (run_dir / "metrics.jsonl").is_file() else 0


class _Launcher:
    """`foundry launch local ...` in the background, its output read as it comes (conftest.Output)."""

    def __init__(self, args: list[str], prefix: list[str] = []):
        """`prefix`: what runs the command, e.g. `ip netns exec NODE` (tests/netns.py)."""
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "foundry.launch.cli", "launch", "local", *args], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.output = Output(self.proc.stdout)

    def wait(self, timeout: float) -> str:
        self.proc.wait(timeout=timeout)
        return self.output.close()

    def wait_for_step(self, step: int, timeout: float) -> None:
        """Until rank 0 has logged training step `step` (of the first attempt)."""
        self.output.wait_for(f"] step {step}/", timeout)

    def first(self, text: str) -> float:
        """When the first line holding `text` arrived (the launcher has exited: nothing more will come)."""
        return self.output.wait_for(text, timeout=0)


def _workers(run_dir: Path) -> dict[int, int]:
    """pid of each training process (by RANK) whose command line names this run's config."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        # The training process itself (not torchrun, not its loader workers, which share its command line).
        if str(run_dir / "config.yaml").encode() in cmd and b"foundry.launch.cli" in cmd and b"RANK" in env \
                and b"torch.distributed.run" not in cmd and int(env.get(b"LOCAL_RANK", b"-1")) >= 0:
            rank = int(env[b"RANK"])
            found[rank] = min(found.get(rank, 1 << 30), int(pid))  # the loader workers are its children
    return found


def test_a_killed_worker_ends_the_job_and_the_relaunch_resumes_from_the_checkpoint(tmp_path, stdlib_shards):
    run_dir = tmp_path / "run"
    launcher = _Launcher([*TINY, *data_args(stdlib_shards), "train.max_steps=60", "checkpoint.interval=10",
                          "launch.max_restarts=2", f"train.run_dir={run_dir}"])
    try:
        launcher.wait_for_step(25, timeout=180)
        victim = _workers(run_dir)[1]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        out = launcher.wait(timeout=240)
    finally:
        launcher.proc.kill()
    assert launcher.proc.returncode == 0, out[-3000:]
    ended = launcher.first("the job failed") - killed_at
    assert ended < 15, f"the job took {ended:.1f} s to end after a worker died"
    assert "relaunching it (1 of 2) from checkpoint step000000" in out
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", out).group(1))
    assert resumed >= 20 and resumed % 10 == 0
    # Steps after the checkpoint ran twice in wall-clock terms, but only the relaunch's count: one record each,
    # and the relaunch started at the step after its checkpoint.
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 61))
    second_attempt = out[out.index("attempt 2 of 3"):]
    assert _steps_in(second_attempt) == list(range(resumed + 1, 61))
    assert read_status(run_dir)["state"] == "finished"
    # No batch repeated or skipped: the steps the first attempt ran past its checkpoint, replayed by the relaunch,
    # see the same batches (the same losses), and the data position at the end counts every sequence once.
    first_attempt = out[:out.index("attempt 2 of 3")]
    lost = {s: loss for s, loss in _losses_in(first_attempt).items() if s > resumed}
    assert len(lost) >= 3 and lost == {s: loss for s, loss in _losses_in(second_attempt).items() if s in lost}
    final = torch.load(run_dir / "checkpoints" / "step00000060" / "mp_rank_00_model_states.pt", weights_only=False)
    assert sum(windows_taken(final["data"]).values()) == 60 * 16  # steps x global batch


def test_sigterm_to_the_launcher_saves_a_checkpoint_and_does_not_relaunch(tmp_path, stdlib_shards):
    run_dir = tmp_path / "run"
    launcher = _Launcher([*TINY, *data_args(stdlib_shards), "train.max_steps=400", "launch.max_restarts=2",
                          f"train.run_dir={run_dir}"])
    try:
        launcher.wait_for_step(5, timeout=180)
        launcher.proc.send_signal(signal.SIGTERM)
        out = launcher.wait(timeout=120)
    finally:
        launcher.proc.kill()
    assert launcher.proc.returncode == 0, out[-3000:]
    status = read_status(run_dir)
    assert status["state"] == "stopped" and status["signal"] == "SIGTERM" and 5 <= status["step"] < 400
    tag = f"step{status['step']:08d}"
    assert (run_dir / "checkpoints" / "latest_complete").read_text().strip() == tag
    assert read_metrics(run_dir)[-1]["step"] == status["step"]
    assert "attempt 2" not in out


def test_two_nodes_meet_through_the_rendezvous_endpoint(tmp_path, stdlib_shards):
    """Two `foundry launch local` commands, as on two machines (here both on localhost), form one 2-rank job."""
    from foundry.pretrain.engine import free_port

    run_dir = tmp_path / "run"
    args = [*TINY, *data_args(stdlib_shards), "launch.nodes=2", "launch.procs_per_node=1",
            f"launch.rdzv_endpoint=127.0.0.1:{free_port()}", "train.max_steps=8", "data.workers=0",
            f"train.run_dir={run_dir}"]
    nodes = [_Launcher(args) for _ in range(2)]
    outs = [node.wait(timeout=240) for node in nodes]
    assert [node.proc.returncode for node in nodes] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "layout: world 2 = tp 1 x pp 1 x dp 2" in "".join(outs)
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 9))


def test_multi_node_needs_an_endpoint(tmp_path, stdlib_shards):
    out = foundry(["launch", "local", *TINY, *data_args(stdlib_shards), "launch.nodes=2", "launch.procs_per_node=1",
                   f"train.run_dir={tmp_path}"])
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "foundry: config error: launch.nodes=2 needs launch.rdzv_endpoint=HOST:PORT, a free port on the first node "
        "that every node can reach (under SLURM use `foundry launch slurm`)"]



def test_the_per_node_slurm_command_refuses_to_run_outside_slurm(tmp_path, stdlib_shards):
    out = foundry(["launch", "node", *TINY, *data_args(stdlib_shards), f"train.run_dir={tmp_path}"])
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [(
        "foundry: launch error: `foundry launch node` is the srun line of a batch script from `foundry launch slurm`: "
        "outside SLURM use `foundry launch local`")], out.stderr

# --- SLURM ---------------------------------------------------------------------------------------------------

SLURM_CPU = ["launch.slurm.partition=cpu", "launch.slurm.gpus=false", "launch.slurm.cpus_per_node=2",
             "launch.slurm.time_minutes=10", "launch.grace_seconds=60"]


def _submit(args: list[str]) -> str:
    from foundry.pretrain.engine import free_port

    out = foundry(["launch", "slurm", *args, f"launch.rdzv_port={free_port()}"])
    assert out.returncode == 0, out.stderr[-3000:]
    return re.search(r"submitted job (\d+)", out.stdout).group(1)


def test_a_slurm_job_trains_with_falling_loss(slurm, tmp_path, stdlib_shards):
    run_dir = tmp_path / "run"
    job = _submit([*TINY, *data_args(stdlib_shards), *SLURM_CPU, "train.max_steps=40", f"train.run_dir={run_dir}"])
    assert wait_until(lambda: job_ended(job, slurm), 240, f"job {job} to end") == "COMPLETED"
    log = (run_dir / f"slurm-{job}.out").read_text()
    losses = [float(x) for x in re.findall(r"\] step \d+/40 \| loss ([\d.]+)", log)]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert "layout: world 2 = tp 1 x pp 1 x dp 2" in log
    assert "training is finished at step 40: not requeueing" in log
    status = foundry(["launch", "status", str(run_dir)]).stdout
    assert f"SLURM {job}: COMPLETED" in status and "finished at step 40 of 40" in status, status


def test_the_time_limit_signal_saves_requeues_and_resumes_with_no_step_run_twice(slurm, tmp_path, stdlib_shards):
    run_dir = tmp_path / "run"
    job = _submit([*TINY, *data_args(stdlib_shards), *SLURM_CPU, "train.max_steps=100", "checkpoint.interval=50",
                   f"train.run_dir={run_dir}"])
    wait_until(lambda: _logged_steps(run_dir) >= 10, 240, "10 logged steps")  # slurmd runs it: no pipe to read
    # What SLURM sends `launch.grace_seconds` before the time limit (--signal=USR1@...): to every job step.
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    wait_until(lambda: scontrol_job(job, slurm).get("Restarts") == "1"
              and scontrol_job(job, slurm).get("JobState") == "PENDING", 120, "the job to requeue itself")
    status = foundry(["launch", "status", str(run_dir)]).stdout
    assert f"SLURM {job}: PENDING" in status and "requeued 1 times" in status, status
    assert "stopped at step" in status and "(by SIGUSR1)" in status, status
    # SLURM holds a requeued job for two minutes before it may start again; skip the wait.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    assert wait_until(lambda: job_ended(job, slurm), 240, f"job {job} to end") == "COMPLETED"

    log = (run_dir / f"slurm-{job}.out").read_text()  # both attempts, appended
    stopped = int(re.search(r"stopped by SIGUSR1 after step (\d+) of 100", log).group(1))
    assert 10 <= stopped < 100
    assert f"requeueing job {job}" in log and f"job {job} attempt 2" in log
    assert f"resumed from {run_dir / 'checkpoints' / f'step{stopped:08d}'} at step {stopped}" in log
    assert _steps_in(log) == list(range(1, 101))  # every step ran exactly once, over the two attempts
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 101))
    assert read_status(run_dir)["state"] == "finished"


def _rendered_70b(stdlib_shards: Path) -> str:
    cfg = load_config(["configs/models/llama3-70b.yaml", "configs/llama3-70b-16x8.yaml"],
                      data_args(stdlib_shards)[:1])
    return render_script(cfg, Path("/shared/foundry/runs/llama3-70b/config.yaml"), Path("/shared/foundry"),
                         python="/shared/foundry/.venv/bin/python")


def test_the_readme_shows_the_rendered_16_node_script_and_slurm_accepts_it(slurm, tmp_path, stdlib_shards):
    script = _rendered_70b(stdlib_shards)
    assert f"```bash\n{script}```" in (REPO / "README.md").read_text(), "README's sbatch example is out of date"
    (tmp_path / "job.sbatch").write_text(script)
    # The gpu partition's 16 nodes x 8 GPUs exist only on paper: --test-only plans the job without running it.
    out = subprocess.run(["sbatch", "--test-only", str(tmp_path / "job.sbatch")], capture_output=True, text=True)
    assert out.returncode == 0 and "using 1536 processors on nodes gpu[01-16] in partition gpu" in out.stderr, out
    bigger = script.replace("--nodes=16", "--nodes=17")
    (tmp_path / "bigger.sbatch").write_text(bigger)
    out = subprocess.run(["sbatch", "--test-only", str(tmp_path / "bigger.sbatch")], capture_output=True, text=True)
    assert out.returncode != 0 and "Requested node configuration is not available" in out.stderr


@pytest.mark.parametrize("overrides, error", [
    (["launch.slurm.partition=nope"], "partition 'nope' does not exist: set launch.slurm.partition to one of cpu, gpu"),
    (["launch.slurm.partition=gpu", "launch.nodes=1", "launch.procs_per_node=16", "parallel.tensor=16",
      "parallel.pipeline=1"],
     "launch.procs_per_node=16 GPUs per node, but the nodes of partition 'gpu' have at most 8: use at most 8 per node"),
    (["launch.slurm.partition=cpu", "launch.nodes=1", "parallel.pipeline=1"], "launch.procs_per_node=8 GPUs per node, but the nodes of partition 'cpu' have at "
     "most 0: set launch.slurm.gpus=false for a CPU-only job"),
    (["launch.nodes=32"], "launch.nodes=32 but partition 'gpu' has 16 nodes: ask for at most 16"),
    (["parallel.tensor=3"], "config error: world size 128 is not divisible by parallel.tensor x parallel.pipeline = "
     "3 x 4"),
], ids=["no-partition", "gpus-per-node", "cpu-partition", "nodes", "layout"])
def test_a_job_the_cluster_cannot_run_is_refused_before_submission(slurm, tmp_path, stdlib_shards, overrides, error):
    out = foundry(["launch", "slurm", "configs/models/llama3-70b.yaml", "configs/llama3-70b-16x8.yaml",
                   *data_args(stdlib_shards)[:1], f"train.run_dir={tmp_path}", *overrides])
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert error in out.stderr
    assert not (tmp_path / "launch.json").exists()  # nothing was submitted


def test_without_sbatch_the_error_says_where_to_run(tmp_path, stdlib_shards):
    out = foundry(["launch", "slurm", *TINY, *data_args(stdlib_shards), f"train.run_dir={tmp_path}"],
                  env={"PATH": str(Path(sys.executable).parent)})
    assert out.returncode == 2
    assert out.stderr.strip() == ("foundry: launch error: sbatch not found on PATH: run this on a SLURM login node, "
                                  "or use `foundry launch local`")
