"""A real SLURM cluster on localhost for the tests: munge, slurmctld and slurmd from Debian's packages
(`bash setup.sh --with-services` installs them), configured in a temporary directory.

Partition `cpu` (default) is this machine, which runs the jobs. Partition `gpu` is 16 nodes of
8 GPUs that exist only on paper: they are cloud nodes (powered down until a job would need them,
and nothing ever powers them up), so `sbatch --test-only` plans a 16-node job on them, while a
job that asks for more than they have is refused, as on a real cluster.

On network namespaces (tests/netns.py) it is a cluster of several hosts instead: a slurmd in each
namespace, as node0, node1, ... at the namespace's address (names that resolve nowhere, as SLURM
node names often do not), and slurmctld on the first. Their commands must run in a namespace too.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, TypeVar

from foundry.pretrain.engine import free_port
from tests.netns import Nodes

T = TypeVar("T")
DAEMONS = ("munged", "slurmctld", "slurmd")


def _hardware() -> str:
    """This machine as `slurmd -C` sees it, with a little memory held back."""
    fields = dict(kv.split("=", 1) for kv in subprocess.check_output(["slurmd", "-C"], text=True).split()
                  if "=" in kv and not kv.startswith(("NodeName", "UpTime")))
    fields["RealMemory"] = str(int(int(fields["RealMemory"]) * 0.9))
    return " ".join(f"{k}={v}" for k, v in fields.items())


def write_config(root: Path, nodes: Nodes | None = None) -> Path:
    (root / "state").mkdir(parents=True, exist_ok=True)
    for name in _node_names(nodes):
        (root / f"spool-{name}").mkdir(exist_ok=True)
    if nodes:
        controller = f"localhost({nodes.addresses[0]})"  # slurmctld accepts 'localhost' as its own name anywhere
        cluster = "".join(f"NodeName=node{i} NodeAddr={a} {_hardware()}\n" for i, a in enumerate(nodes.addresses))
        cluster += f"PartitionName=cpu Nodes=node[0-{len(nodes.addresses) - 1}] Default=YES State=UP MaxTime=INFINITE"
    else:
        controller = "localhost"
        cluster = f"""\
# Paper nodes first: slurmctld 22.05 refuses (a duplicated NodeHostName) node lines after a NodeAddr=127.0.0.1 one.
NodeName=gpu[01-16] NodeAddr=127.0.1.[1-16] CPUs=96 Boards=1 SocketsPerBoard=2 CoresPerSocket=48 ThreadsPerCore=1 RealMemory=1000000 Gres=gpu:8 State=CLOUD
NodeName=localhost NodeAddr=127.0.0.1 {_hardware()}
PartitionName=cpu Nodes=localhost Default=YES State=UP MaxTime=INFINITE
PartitionName=gpu Nodes=gpu[01-16] State=UP MaxTime=INFINITE"""
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=foundrytest
SlurmctldHost={controller}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
GresTypes=gpu
SuspendProgram=/bin/true
ResumeProgram=/bin/true
SuspendTime=3600
PrivateData=cloud
{cluster}
""")
    return conf


def _node_names(nodes: Nodes | None) -> list[str]:
    return [f"node{i}" for i in range(len(nodes.names))] if nodes else ["localhost"]


def in_node(nodes: Nodes | None, i: int = 0) -> list[str]:
    """What runs a command on node i: nothing on localhost; in a namespace, nsenter (not `ip netns exec`, which
    mounts a fresh /sys without the cgroup filesystem that slurmd needs)."""
    return ["nsenter", f"--net=/run/netns/{nodes.names[i]}"] if nodes else []


def start(root: Path, nodes: Nodes | None = None) -> tuple[Path, list[int]]:
    """Start the daemons (on `nodes` when given); returns slurm.conf and the pids this call started (munged is
    shared if running)."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not installed: run `bash setup.sh --with-services` (as root)")
    started = []
    if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"], check=True)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        started.append(int(Path("/run/munge/munged.pid").read_text()))
    conf = write_config(root, nodes)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run([*in_node(nodes), "/usr/sbin/slurmctld", "-f", str(conf), "-c"], check=True, env=env)
    names = _node_names(nodes)
    for i, name in enumerate(names):
        subprocess.run([*in_node(nodes, i), "/usr/sbin/slurmd", "-f", str(conf), "-N", name], check=True, env=env)
    wait_until(lambda: subprocess.run([*in_node(nodes), "sinfo", "-h", "-p", "cpu", "-o", "%t"], capture_output=True,
                                      text=True, env=env).stdout.strip() == "idle",
               60, f"the SLURM nodes to become idle (logs in {root})")
    for pid_file in ("slurmctld.pid", *(f"slurmd-{name}.pid" for name in names)):
        started.append(int((root / pid_file).read_text()))
    return conf, started


def wait_until(condition: Callable[[], T], timeout: float, what: str, poll: float = 0.5) -> T:
    """Polls `condition` until it gives a true value, and returns that. Only for what SLURM keeps to itself (a
    node's or a job's state, a log slurmd writes): no SLURM command blocks until a job ends or a node is up."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)
    return value


def stop(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def scontrol_job(job_id: str, conf: Path, nodes: Nodes | None = None) -> dict[str, str]:
    out = subprocess.run([*in_node(nodes), "scontrol", "show", "job", "--oneliner", job_id], capture_output=True,
                         text=True, env={**os.environ, "SLURM_CONF": str(conf)})
    return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)


def job_ended(job_id: str, conf: Path, nodes: Nodes | None = None) -> str | None:
    """The job's final state, or None while it may still run (COMPLETING is not final: its log is not whole yet)."""
    state = scontrol_job(job_id, conf, nodes).get("JobState")
    return state if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") else None
