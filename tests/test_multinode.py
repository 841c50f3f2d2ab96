"""Multi-node jobs across hosts with their own addresses: network namespaces on this machine
(tests/netns.py), one `foundry launch local` per node, c10d rendezvous on the first node; and a
SLURM cluster of two such hosts, a slurmd on each (tests/slurm_cluster.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests import slurm_cluster
from tests.conftest import REPO, data_args, read_metrics, torchrun
from tests.netns import Nodes
from tests.slurm_cluster import in_node, job_ended, wait_until
from tests.test_launch import _Launcher, _steps_in

MULTI = ["configs/models/tiny.yaml", "configs/quickstart.yaml", "train.global_batch_size=8", "train.micro_batch_size=4",
         "train.warmup_steps=2", "data.seq_len=64", "tracking.log_interval=1", "checkpoint.resume=true",
         "tracking.mlflow=false", "data.workers=0"]
PORT = 29400


def _need_root() -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (`ip`): run the suite as root, as CI does")


@pytest.fixture
def nodes(request):
    _need_root()
    with Nodes(request.param) as made:
        yield made


@pytest.fixture
def slurm_nodes(tmp_path):
    """Two hosts, each running a slurmd (node0, node1), slurmctld on node0; yields them and slurm.conf."""
    _need_root()
    started = []
    try:
        with Nodes(2) as made:
            conf, started = slurm_cluster.start(tmp_path / "slurm", made)
            yield made, conf
    finally:  # the namespaces' processes are killed with them; munged, if this started it, is not in one
        slurm_cluster.stop(started)


def _launch(nodes: Nodes, args: list[str]) -> list[_Launcher]:
    common = [f"launch.nodes={len(nodes.names)}", "launch.procs_per_node=1",
              f"launch.rdzv_endpoint={nodes.addresses[0]}:{PORT}"]
    return [_Launcher([*args, *common], prefix=["ip", "netns", "exec", name]) for name in nodes.names]


def _wait_all(launchers: list[_Launcher], timeout: float) -> list[str]:
    return [launcher.wait(timeout=timeout) for launcher in launchers]


@pytest.mark.parametrize("nodes", [2], indirect=True)
def test_two_nodes_of_one_process_give_the_losses_of_one_node_of_two(nodes, tmp_path, stdlib_shards):
    args = [*MULTI, *data_args(stdlib_shards), "data.workers=0", "train.max_steps=8"]
    outs = _wait_all(_launch(nodes, [*args, f"train.run_dir={tmp_path / 'multi'}"]), timeout=300)
    for i, out in enumerate(outs):
        hosted = "yes" if i == 0 else "no"
        assert (f"node address {nodes.addresses[i]} on interface eth0 | rendezvous {nodes.addresses[0]}:{PORT} "
                f"({nodes.addresses[0]}), store hosted here: {hosted}") in out, out[-3000:]
        assert "finished: step 8 of 8" in out, out[-3000:]
    torchrun(2, [*args, f"train.run_dir={tmp_path / 'single'}"])
    multi, single = read_metrics(tmp_path / "multi"), read_metrics(tmp_path / "single")
    assert len(multi) == len(single) == 8
    for a, b in zip(multi, single):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-6, (a, b)


@pytest.mark.parametrize("nodes", [3], indirect=True)
def test_three_nodes_run_a_three_stage_pipeline(nodes, tmp_path, stdlib_shards):
    run_dir = tmp_path / "run"
    outs = _wait_all(_launch(nodes, [*MULTI, *data_args(stdlib_shards), "data.workers=0", "parallel.pipeline=3",
                                     "train.max_steps=6", f"train.run_dir={run_dir}"]), timeout=300)
    assert all("finished: step 6 of 6" in out for out in outs), outs[0][-3000:]
    assert "layout: world 3 = tp 1 x pp 3 x dp 1" in outs[0]
    losses = [m["loss"] for m in read_metrics(run_dir)]
    assert len(losses) == 6 and losses[-1] < losses[0]


@pytest.mark.parametrize("nodes", [2], indirect=True)
def test_a_killed_node_ends_the_job_within_seconds_and_the_relaunch_resumes(nodes, tmp_path, stdlib_shards):
    run_dir = tmp_path / "run"
    launchers = _launch(nodes, [*MULTI, *data_args(stdlib_shards), "data.workers=0", "train.max_steps=40",
                                "checkpoint.interval=5", "launch.max_restarts=1", f"train.run_dir={run_dir}"])
    try:
        launchers[0].wait_for_step(12, timeout=240)  # node 0 holds rank 0, which logs the steps
        nodes.kill(1, spare={launchers[1].proc.pid})  # node 1's torchrun and its worker: the node's job dies
        killed_at = time.time()
        outs = _wait_all(launchers, timeout=300)
    finally:
        for launcher in launchers:
            launcher.proc.kill()
    ended = launchers[0].first("the job failed") - killed_at
    assert ended < 10, f"node 0 noticed the dead node after {ended:.1f} s"
    for out in outs:
        assert "relaunching it (1 of 1)" in out and "finished: step 40 of 40" in out, out[-3000:]
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", outs[0]).group(1))
    assert resumed >= 10 and resumed % 5 == 0
    assert _steps_in(outs[0][outs[0].index("attempt 2 of 2"):]) == list(range(resumed + 1, 41))
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 41))  # no step twice


@pytest.mark.parametrize("nodes", [2], indirect=True)
def test_a_node_whose_link_goes_down_ends_the_job_within_the_timeout(nodes, tmp_path, stdlib_shards):
    run_dir = tmp_path / "run"
    timeout = 20
    launchers = _launch(nodes, [*MULTI, *data_args(stdlib_shards), "data.workers=0", "train.max_steps=100000",
                                f"train.collective_timeout_seconds={timeout}", "train.step_timeout_seconds=600",
                                f"train.run_dir={run_dir}"])
    try:
        launchers[0].wait_for_step(5, timeout=240)
        nodes.link_down(1)
        cut_at = time.time()
        out = launchers[0].wait(timeout=timeout + 60)
    finally:
        for launcher in launchers:
            launcher.proc.kill()
    ended = launchers[0].first("the job failed") - cut_at
    assert ended < timeout + 10, f"node 0 ended {ended:.1f} s after the link went down (timeout {timeout} s)"
    assert f"blame rank 1 (node {nodes.addresses[1]})" in out, out[-3000:]


def test_a_two_node_slurm_job_meets_at_the_first_nodes_address_and_matches_one_node(slurm_nodes, tmp_path,
                                                                                    stdlib_shards):
    nodes, conf = slurm_nodes
    args = [*MULTI, *data_args(stdlib_shards), "train.max_steps=8"]
    submit = subprocess.run(
        [*in_node(nodes), sys.executable, "-m", "foundry.launch.cli", "launch", "slurm", *args, "launch.nodes=2",
         "launch.procs_per_node=1", "launch.slurm.gpus=false", "launch.slurm.time_minutes=10",
         f"train.run_dir={tmp_path / 'multi'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "SLURM_CONF": str(conf)})
    assert submit.returncode == 0, submit.stderr[-3000:]
    job = re.search(r"submitted job (\d+)", submit.stdout).group(1)
    state = wait_until(lambda: job_ended(job, conf, nodes), 300, f"job {job} to end")
    log = (tmp_path / "multi" / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    # The node names (node0, node1) resolve nowhere: the rendezvous is at node0's SLURM NodeAddr.
    assert f"rendezvous {nodes.addresses[0]}:29500" in log
    for i, address in enumerate(nodes.addresses):
        assert re.search(rf"node {i} of 2 \(\S+\): node address {re.escape(address)} on interface eth0 \| "
                         rf"rendezvous {nodes.addresses[0]}:29500 \({nodes.addresses[0]}\), store hosted here: "
                         f"{'yes' if i == 0 else 'no'}", log), log[-3000:]
    torchrun(2, [*args, f"train.run_dir={tmp_path / 'single'}"])
    multi, single = read_metrics(tmp_path / "multi"), read_metrics(tmp_path / "single")
    assert len(multi) == len(single) == 8
    for a, b in zip(multi, single):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-6, (a, b)


_RESOLVE = """
import sys
from foundry.launch.network import resolve, NetworkError
from foundry.pretrain.config import LaunchConfig
try:
    launch = LaunchConfig(nodes=2, rdzv_endpoint="127.0.1.1:29500", interface=sys.argv[1])
    print(resolve(launch, first_node=True).describe())
except NetworkError as e:
    print(e)
"""


@pytest.mark.parametrize("nodes", [1], indirect=True)
def test_a_first_node_whose_name_resolves_to_loopback_needs_the_interface(nodes):
    def resolve_on_node(interface: str) -> str:
        return subprocess.run([*in_node(nodes), sys.executable, "-c", _RESOLVE, interface], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout.strip()

    # As on Debian, where a node's own name is 127.0.1.1: the route to it says nothing the other nodes can use.
    assert resolve_on_node("").startswith("the rendezvous host '127.0.1.1' is 127.0.1.1 (loopback) on this node, "
                                          "which the other nodes cannot reach: set launch.interface to the network "
                                          "the nodes share (one of eth0, lo)")
    assert resolve_on_node("eth0") == (f"node address {nodes.addresses[0]} on interface eth0 | rendezvous "
                                       f"127.0.1.1:29500 (127.0.1.1), store hosted here: yes")
