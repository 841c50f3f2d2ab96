"""The hang watchdog: a job whose ranks stop finishing steps ends, with the culprit named, instead of
waiting in a collective for ever.

Every rank runs a thread. After each step the rank records its step in the process group's store
(the c10d key-value store torchrun serves), and the thread records every few seconds that the
process is alive. When this rank has finished no step for `train.step_timeout_seconds`, the
thread names the ranks to blame: those whose process stopped answering (killed, frozen, swapped
out) and those a step behind; the others are waiting for them in a collective. It logs every
rank's last step, writes every thread's Python stack to this rank's log (where a rank stuck in
its own code shows where), and exits the process with code 3, so torchrun ends the job and
`foundry launch` can relaunch it from the last checkpoint.
The clock starts after the first step (start-up and compilation take as long as they take).
A save or an evaluation is timed on its own limit instead (`busy`: checkpoint.timeout_seconds,
eval.timeout_seconds; 0 there: no limit), and the step clock restarts when it ends.
When a collective fails instead (gloo and NCCL notice a peer that died), `explain` names the culprits
from the same records. With train.step_timeout_seconds=0 the watchdog is off and keeps no records.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch.distributed as dist

from foundry.pretrain.config import first_line

log = logging.getLogger("foundry")

EXIT_CODE = 3

STEP_KEY = "train.step_timeout_seconds"


@dataclasses.dataclass(frozen=True)
class _Clock:
    """What this rank is timed on: `what` (None: a training step) since `since` (time.monotonic()), for at most
    `limit` seconds (0: no limit), which the config key `key` sets."""

    what: str | None
    limit: float
    key: str
    since: float

    def overdue(self, now: float) -> bool:
        return bool(self.limit) and now - self.since > self.limit

    def describe(self, now: float) -> str:
        late = f"{now - self.since:.0f} s ({self.key}={self.limit:g})"
        return f"no step finished for {late}" if self.what is None else f"{self.what} has run for {late}"


class Watchdog:
    """This rank's heartbeat in the store, and the thread that ends a job whose steps, saves or evaluations stopped."""

    def __init__(self, store: Any, rank: int, world_size: int, timeout: float, stack_path: Path):
        self.store, self.rank, self.world_size, self.timeout = store, rank, world_size, timeout
        self.step: int | None = None
        self.clock: _Clock | None = None  # None until the first step; replaced whole, so the thread reads it whole
        self._done = threading.Event()
        if not timeout:
            return
        self.stack_file = stack_path.open("a")  # open now: faulthandler writes to its descriptor
        # Where each rank runs, to name nodes in the blame: the launcher's FOUNDRY_NODE_ADDR, else the hostname.
        self._set(f"foundry/node/{rank}", os.environ.get("FOUNDRY_NODE_ADDR") or socket.gethostname())
        threading.Thread(target=self._watch, name="foundry-watchdog", daemon=True).start()

    @classmethod
    def for_rank(cls, timeout: float, run_dir: Path) -> Watchdog:
        """This rank's watchdog (`timeout`: train.step_timeout_seconds), keeping its records in torchrun's store;
        its stacks go to this rank's log in `run_dir`."""
        rank = dist.get_rank()
        return cls(dist.distributed_c10d._get_default_store(), rank, dist.get_world_size(), timeout,
                   run_dir / "logs" / f"rank{rank}.log")

    def beat(self, step: int) -> None:
        """Step `step` finished on this rank."""
        if not self.timeout:
            return
        self.step, self.clock = step, _Clock(None, self.timeout, STEP_KEY, time.monotonic())
        self._set(f"foundry/heartbeat/{self.rank}", step)

    @contextmanager
    def busy(self, what: str, timeout: float, key: str) -> Iterator[None]:
        """Time the block as `what` (e.g. "saving checkpoint step00000100"), for at most `timeout` seconds (0: no
        limit), which the config key `key` sets, instead of as a step; the step clock restarts when it ends."""
        if not self.timeout:
            yield
            return
        outside = self.clock
        self.clock = _Clock(what, timeout, key, time.monotonic())
        try:
            yield
        finally:
            self.clock = None if outside is None else dataclasses.replace(outside, since=time.monotonic())

    def explain(self, e: BaseException) -> None:
        """If `e` is a collective that failed (a peer died or went silent), say which ranks to blame."""
        if _collective_failed(e):
            log.error("a collective failed (%s); %s", first_line(e)[:300],
                      self.culprits() if self.timeout else "no watchdog records (train.step_timeout_seconds=0)")

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(timeout=self.interval):
            self._set(f"foundry/alive/{self.rank}", time.time())
            clock = self.clock
            if clock is not None and clock.overdue(time.monotonic()):
                self._fire(clock)

    @property
    def interval(self) -> float:
        return min(self.timeout / 4, 5.0)

    def culprits(self) -> str:
        """Which ranks (on which nodes) stopped answering or fell behind, and every rank's last step."""
        steps, alive = self._read("foundry/heartbeat"), self._read("foundry/alive")
        nodes = self._read("foundry/node")
        newest = max(steps.values(), default=self.step or 0)
        now = time.time()
        silent = [r for r in range(self.world_size) if now - alive.get(r, 0.0) > 3 * self.interval]
        behind = [r for r in range(self.world_size) if steps.get(r, -1) < newest]
        blamed = sorted(set(silent) | set(behind))
        seen = ", ".join(f"rank {r}: step {steps.get(r, 'none')}"
                         + (", not answering" if r in silent else "") for r in range(self.world_size))
        blame = "; ".join(f"rank {r}" + (f" (node {nodes[r]})" if r in nodes else "") for r in blamed)
        return (f"blame {blame}" if blamed else "no rank is silent or behind: compare the stacks in the rank logs") \
            + f"; last steps: {seen}"

    def _fire(self, clock: _Clock) -> None:
        after = "" if self.step is None else f" after step {self.step}"
        log.error("watchdog: %s%s; %s. Stacks of every thread follow in the rank logs; exiting so the job ends",
                  clock.describe(time.monotonic()), after, self.culprits())
        self.stack_file.write(f"--- watchdog: Python stacks of rank {self.rank} ---\n")
        self.stack_file.flush()
        faulthandler.dump_traceback(file=self.stack_file, all_threads=True)
        self.stack_file.flush()
        os._exit(EXIT_CODE)

    def _set(self, key: str, value: float | str) -> None:
        try:
            self.store.set(key, json.dumps(value))
        except Exception:  # noqa: BLE001 - a store gone with the job must not kill the watchdog itself
            pass

    def _read(self, prefix: str) -> dict[int, float]:
        values = {}
        for r in range(self.world_size):
            key = f"{prefix}/{r}"
            try:
                if self.store.check([key]):
                    values[r] = json.loads(self.store.get(key))
            except Exception:  # noqa: BLE001 - the store may be gone with the job; report what we have
                continue
        return values


def _collective_failed(e: BaseException) -> bool:
    """A collective that timed out or lost its peer (gloo reports these as plain RuntimeErrors)."""
    return isinstance(e, dist.DistError) or isinstance(e, RuntimeError) and any(
        word in str(e) for word in ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer"))
