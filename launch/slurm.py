"""`foundry launch slurm`: an sbatch script rendered from the run's config, checked and submitted.

The script asks for `launch.nodes` nodes with one task each; `srun` runs `foundry launch node` once
per node (`run_node`), which derives the node's address, network interface and rendezvous role
(launch/network.py), logs them and becomes that node's torchrun; the torchruns meet (c10d
rendezvous) at the first node's SLURM NodeAddr, since node names often do not resolve, or resolve
to 127.0.1.1 on the node itself. It trains the
resolved config that `foundry launch` wrote to RUN_DIR/config.yaml, so a requeued job runs what
was submitted, not what the YAML files say by then.

Time limits: the job asks SLURM for SIGUSR1 `launch.grace_seconds` before its limit
(`--signal=USR1@...`, sent to every process of the job step). Training finishes its step, saves
and records `stopped` in RUN_DIR/status.json (pretrain/stop.py); the script's last line,
`foundry launch requeue`, then puts the job back in the queue (`scontrol requeue`), and the
next attempt resumes from that checkpoint. SIGTERM (pre-emption, scancel) also saves, but does
not requeue: a cancelled job stays cancelled, and a pre-empting SLURM requeues on its own.
SLURM holds a requeued job for about two minutes before it is eligible again.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from foundry.launch.record import record_job
from foundry.launch.network import resolve
from foundry.launch.torchrun import TORCHRUN_ENV, torchrun_command
from foundry.pretrain.config import RunConfig
from foundry.pretrain.stop import read_status

log = logging.getLogger("foundry.launch")


class LaunchError(RuntimeError):
    """The cluster cannot run the job as configured; the message is one line naming the fix."""


@dataclass
class Node:
    name: str
    partitions: list[str]
    cpus: int
    gpus: int


def render_script(cfg: RunConfig, config_path: Path, workdir: Path, python: str = sys.executable) -> str:
    """The batch script for `cfg`, training `config_path` from `workdir`."""
    la, s = cfg.launch, cfg.launch.slurm
    run_dir = (workdir / cfg.train.run_dir).resolve()
    options = [
        f"--job-name={s.job_name or run_dir.name}",
        f"--nodes={la.nodes}",
        "--ntasks-per-node=1",
        *([f"--gpus-per-node={la.procs_per_node}"] if s.gpus else []),
        *([f"--cpus-per-task={s.cpus_per_node}"] if s.cpus_per_node else []),
        f"--time={s.time_minutes}",
        *([f"--partition={s.partition}"] if s.partition else []),
        *([f"--account={s.account}"] if s.account else []),
        f"--output={s.output or run_dir / 'slurm-%j.out'}",
        "--open-mode=append",  # every attempt of a requeued job logs to the same file
        f"--chdir={workdir}",
        f"--signal=USR1@{la.grace_seconds}",
        *(["--requeue"] if s.requeue else []),
    ]
    env = {**s.env, **TORCHRUN_ENV}
    for what, value in [("train.run_dir", str(run_dir)), ("the working directory", str(workdir)),
                        ("the config path", str(config_path)), *((f"launch.slurm.env.{k}", str(v)) for k, v in env.items()),
                        *(("a #SBATCH option", o) for o in [*options, *s.sbatch_lines])]:
        if any(ord(c) < 32 or c == "\x7f" for c in value):
            raise LaunchError(f"{what} ({value!r}) contains a line break or control character, which a batch "
                              f"script cannot carry safely: remove it")
    node = [python, "-m", "foundry.launch.cli", "launch", "node", str(config_path),
            f"launch.rdzv_endpoint=$head_addr:{la.rdzv_port}"]
    lines = [
        "#!/bin/bash",
        f"# Written by `foundry launch slurm` for {run_dir}; `sbatch` this file to submit it again.",
        f"# One torchrun per node ({la.procs_per_node} workers each); they meet on the allocation's first node.",
        *(f"#SBATCH {_directive(o)}" for o in options),
        *(f"#SBATCH {o}" for o in s.sbatch_lines),  # the user's own lines, as written
        "",
        *(f"export {k}={shlex.quote(str(v))}" for k, v in env.items()),
        "",
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "# The address SLURM reaches the first node at: node names may not resolve, or resolve to 127.0.1.1.",
        """head_addr=$(scontrol -o show node "$head" | sed -n 's/.* NodeAddr=\\([^ ]*\\).*/\\1/p')""",
        'echo "foundry: job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1)) on $SLURM_JOB_NODELIST, '
        f'rendezvous $head_addr:{la.rdzv_port}"',
        "# On each node: derive and log its address and interface, then run torchrun (see `foundry launch --help`).",
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 \\",
        "  " + _shell_join(node),
        "# Requeues the job if training stopped for the time-limit warning; it resumes from its checkpoint.",
        shlex.join([python, "-m", "foundry.launch.cli", "launch", "requeue", str(run_dir)]),
        "",
    ]
    return "\n".join(lines)


def _directive(option: str) -> str:
    """An option as sbatch reads it from a #SBATCH line (bash sees only a comment). sbatch splits these at
    whitespace, honours quotes and cuts at #: a value with any of those is quoted with a quote it lacks."""
    if not re.search(r"""[\s"'#\\]""", option):
        return option
    flag, _, value = option.partition("=")
    quote = next((q for q in '"\'' if q not in value), None)
    if quote is None or "\\" in value:
        raise LaunchError(f"{option!r} has both kinds of quote or a backslash, which a #SBATCH line cannot carry: "
                          f"rename it")
    return f"{flag}={quote}{value}{quote}"


def _shell_join(args: list[str]) -> str:
    # Our rendezvous override names a shell variable of the job ($head_addr): double-quoted, so it expands. Every
    # other argument (paths from the config among them) is single-quoted: it stays text.
    return " ".join(f'"{a}"' if a.startswith("launch.rdzv_endpoint=") else shlex.quote(a) for a in args)


def run_node(cfg: RunConfig, config_path: Path) -> NoReturn:
    """The batch script's srun line, on each node: derive this node's address and interface (SLURM's node 0
    hosts the rendezvous store), log them, and become this node's torchrun, so that SLURM's signals reach
    torchrun itself and its exit code is the step's."""
    la, node = cfg.launch, os.environ.get("SLURM_NODEID")
    if node is None or "SLURM_JOB_ID" not in os.environ:
        raise LaunchError("`foundry launch node` is the srun line of a batch script from `foundry launch slurm`: "
                          "outside SLURM use `foundry launch local`")
    network = resolve(la, first_node=node == "0") if la.nodes > 1 else None
    log.info("node %s of %d (%s): %s", node, la.nodes, os.uname().nodename,
             network.describe() if network else "the only node, torchrun --standalone")
    cmd = torchrun_command(la, str(config_path), endpoint=la.rdzv_endpoint if network else "", network=network,
                           rdzv_id=f"{os.environ['SLURM_JOB_ID']}-{os.environ.get('SLURM_RESTART_COUNT', '0')}")
    os.execvpe(cmd[0], cmd, {**os.environ, **TORCHRUN_ENV, **(network.env() if network else {})})


def check_cluster(cfg: RunConfig) -> None:
    """Refuse, before submitting, a job this cluster cannot run."""
    la, s = cfg.launch, cfg.launch.slurm
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        raise LaunchError("sbatch not found on PATH: run this on a SLURM login node, or use `foundry launch local`")
    nodes = cluster_nodes()
    default = next((p.rstrip("*") for n in nodes for p in n.partitions if p.endswith("*")), "")
    partitions = sorted({p.rstrip("*") for n in nodes for p in n.partitions})
    partition = s.partition or default
    if partition not in partitions:
        raise LaunchError(f"partition '{partition}' does not exist: set launch.slurm.partition to one of "
                          f"{', '.join(partitions)}" if s.partition else
                          f"this cluster has no default partition: set launch.slurm.partition (one of {partitions})")
    members = [n for n in nodes if partition in (p.rstrip("*") for p in n.partitions)]
    if la.nodes > len(members):
        raise LaunchError(f"launch.nodes={la.nodes} but partition '{partition}' has {len(members)} nodes: ask for "
                          f"at most {len(members)}")
    if s.gpus:
        most = max(n.gpus for n in members)
        if sum(n.gpus >= la.procs_per_node for n in members) < la.nodes:
            raise LaunchError(
                f"launch.procs_per_node={la.procs_per_node} GPUs per node, but the nodes of partition '{partition}' "
                f"have at most {most}: " + (f"use at most {most} per node" if most else
                                            "set launch.slurm.gpus=false for a CPU-only job"))
    most_cpus = max(n.cpus for n in members)
    if s.cpus_per_node > most_cpus:
        raise LaunchError(f"launch.slurm.cpus_per_node={s.cpus_per_node} but the nodes of partition '{partition}' "
                          f"have at most {most_cpus} CPUs: ask for at most {most_cpus}")


def cluster_nodes() -> list[Node]:
    out = _run(["sinfo", "--noheader", "--Node", "--format=%N|%P|%c|%G"])
    nodes: dict[str, Node] = {}
    for line in out.splitlines():
        name, partition, cpus, gres = line.split("|")
        node = nodes.setdefault(name, Node(name, [], int(cpus.rstrip("+")), _gpus(gres)))
        node.partitions.append(partition)
    return list(nodes.values())


def _gpus(gres: str) -> int:
    """GPUs in a sinfo GRES field such as 'gpu:8', 'gpu:h100:8(S:0-1)' or '(null)'."""
    gres = re.sub(r"\([^)]*\)", "", gres)
    return sum(int(item.split(":")[-1]) for item in gres.split(",")
               if item.startswith("gpu:") and item.split(":")[-1].isdigit())


def launch(cfg: RunConfig, config_path: Path, dry_run: bool = False) -> int:
    """Print the batch script, or check the cluster, write RUN_DIR/job.sbatch and submit it."""
    script = render_script(cfg, config_path.resolve(), Path.cwd())
    if dry_run:
        print(script, end="")
        return 0
    check_cluster(cfg)
    run_dir = Path(cfg.train.run_dir)
    script_path = run_dir / "job.sbatch"
    script_path.write_text(script)
    job_id = _run(["sbatch", "--parsable", str(script_path)]).strip().split(";")[0]
    record_job(run_dir, scheduler="slurm", job_id=job_id, script=str(script_path.resolve()))
    print(f"submitted job {job_id}: {script_path}; follow it with `foundry launch status {run_dir}`")
    return 0


def requeue_if_stopped(run_dir: Path) -> int:
    """Run by the batch script after training: requeue the job when training stopped for the time-limit warning."""
    status = read_status(run_dir) or {}
    job_id = os.environ.get("SLURM_JOB_ID")
    if status.get("state") != "stopped" or status.get("signal") != "SIGUSR1" or not job_id:
        print(f"foundry: training is {status.get('state', 'not started')} at step {status.get('step', 0)}: "
              f"not requeueing", flush=True)
        return 0
    print(f"foundry: stopped at step {status['step']} of {status['max_steps']} before the time limit: requeueing "
          f"job {job_id}; it resumes from that checkpoint", flush=True)
    _run(["scontrol", "requeue", job_id])
    return 0


def job_state(job_id: str) -> dict[str, str] | None:
    """The job's state, run time, nodes and restart count, while SLURM still knows it."""
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    fields = dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)
    return {k: fields.get(k, "?") for k in ("JobState", "Reason", "RunTime", "NodeList", "Restarts", "StdOut")}


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise LaunchError(f"{cmd[0]} not found on PATH: run this on a SLURM login node") from None
    if out.returncode != 0:
        reason = (out.stderr.strip().splitlines() or ["no message"])[-1]
        raise LaunchError(f"`{shlex.join(cmd)}` failed: {reason}")
    return out.stdout
