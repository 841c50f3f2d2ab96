"""`foundry launch local`: torchrun on this machine, or on each machine of a multi-node job.

One node: `torchrun --standalone`. Several nodes (outside SLURM): every node runs the same
`foundry launch local` command; torchrun's c10d rendezvous at `launch.rdzv_endpoint` (a port on the
first node) forms the job.

A job whose process dies ends as a whole: torchrun stops the other workers (gloo fails their
collectives within seconds). The launcher then relaunches it, up to `launch.max_restarts` times,
and the relaunch resumes from the newest complete checkpoint. torchrun's own in-place restarts
(`--max-restarts`) are not used: they do not re-form gloo groups reliably, a new job does.
A stop signal (Ctrl-C, SIGTERM, SIGUSR1) is passed on to the job, which saves and stops; a
stopped job is not relaunched.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from foundry.launch.record import record_job
from foundry.launch.network import NodeNetwork, resolve
from foundry.pretrain.checkpoint import find_latest
from foundry.pretrain.config import ConfigError, LaunchConfig
from foundry.pretrain.metrics import duration
from foundry.pretrain.stop import STOP_SIGNALS, read_status

log = logging.getLogger("foundry.launch")

# torchrun passes these on to its workers (and waits for them); by default SIGUSR1, SLURM's time-limit warning,
# would kill it instead.
TORCHRUN_ENV = {"TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}


def torchrun_command(launch: LaunchConfig, config_path: str, *, endpoint: str, rdzv_id: str,
                     python: str = sys.executable, network: NodeNetwork | None = None) -> list[str]:
    """The per-node command that trains `config_path`. `endpoint` '' means one node, standalone; `network`,
    this node's address and rendezvous role when they are known (see launch/network.py)."""
    rendezvous = ["--standalone"] if not endpoint else [
        f"--nnodes={launch.nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}",
        *(network.torchrun_args() if network else []),
    ]
    return [python, "-m", "torch.distributed.run", *rendezvous, f"--nproc-per-node={launch.procs_per_node}",
            # The workers' grace to save after a stop signal, before torchrun kills them.
            f"--shutdown-timeout={launch.grace_seconds}",
            "-m", "foundry.launch.cli", "train", config_path]


def check_endpoint(launch: LaunchConfig) -> None:
    if launch.nodes > 1 and ":" not in launch.rdzv_endpoint:
        raise ConfigError(f"launch.nodes={launch.nodes} needs launch.rdzv_endpoint=HOST:PORT, a free port on the first "
                          f"node that every node can reach (under SLURM use `foundry launch slurm`)")


def run_local(launch: LaunchConfig, config_path: Path, run_dir: Path, dry_run: bool = False) -> int:
    """Run the job on this node, relaunching it after a failure; returns the exit code."""
    attempts = launch.max_restarts + 1
    if dry_run:
        print(shlex.join(torchrun_command(launch, str(config_path), endpoint=launch.rdzv_endpoint,
                                          rdzv_id=f"{run_dir.name}-1")))
        return 0
    network = resolve(launch) if launch.rdzv_endpoint else None
    if network:
        log.info("%s", network.describe())
    record_job(run_dir, scheduler="local", pid=os.getpid(), host=os.uname().nodename)
    for attempt in range(1, attempts + 1):
        # A fresh rendezvous id and store port per attempt (every node's launcher counts the same attempts): a
        # node that relaunches first must not join the store of the attempt that is still dying elsewhere.
        cmd = torchrun_command(launch, str(config_path), endpoint=_attempt_endpoint(launch.rdzv_endpoint, attempt),
                               rdzv_id=f"{run_dir.name}-{attempt}", network=network)
        log.info("attempt %d of %d: %s", attempt, attempts, shlex.join(cmd))
        started = time.monotonic()
        rc, stop_signal = _run_forwarding_signals(cmd, network.env() if network else {})
        status = read_status(run_dir) or {}
        took = duration(time.monotonic() - started)
        if rc == 0 and status.get("state") == "finished":
            log.info("finished: step %d of %d in %s", status["step"], status["max_steps"], took)
            return 0
        if status.get("state") == "failed":
            log.error("the job failed at step %s and is not relaunched: %s", status["step"], status["reason"])
            return rc or 1
        if status.get("state") == "stopped" or stop_signal:
            log.info("stopped by %s at step %s: the same command resumes it", status.get("signal") or stop_signal,
                     status.get("step", "?"))
            return 0 if status.get("state") == "stopped" else rc or 1
        if attempt == attempts:
            log.error("the job failed (exit %d) after %s; no relaunch left (launch.max_restarts=%d)", rc, took,
                      launch.max_restarts)
            return rc or 1
        tag = find_latest(run_dir / "checkpoints")
        log.warning("the job failed (exit %d) after %s; relaunching it (%d of %d) from %s", rc, took, attempt,
                    launch.max_restarts, f"checkpoint {tag}" if tag else "the start: no checkpoint completed")
    raise AssertionError("unreachable")


def _attempt_endpoint(endpoint: str, attempt: int) -> str:
    """HOST:PORT of attempt N: PORT + N - 1 ('' stays '': one node, standalone)."""
    if not endpoint:
        return endpoint
    host, _, port = endpoint.rpartition(":")
    return f"{host}:{int(port) + attempt - 1}"


def _run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> tuple[int, str | None]:
    """Run torchrun in its own session, passing each stop signal this process gets on to it exactly once
    (in our process group a Ctrl-C would reach it twice)."""
    got: list[str] = []
    proc = subprocess.Popen(cmd, start_new_session=True, env={**os.environ, **TORCHRUN_ENV, **env})

    def forward(signum: int, frame: object) -> None:
        got.append(signal.Signals(signum).name)
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        return proc.wait(), (got[0] if got else None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
