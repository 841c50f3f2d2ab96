"""Fault injection on CPU with torchrun: a frozen rank trips the hang watchdog, which names it."""

from __future__ import annotations

import os
import signal
import time

from tests.conftest import data_args
from tests.test_launch import TINY, _Launcher, _logged_steps, _wait_for, _workers


def test_a_frozen_rank_trips_the_watchdog_which_names_it_within_the_limit(tmp_path, stdlib_shards):
    run_dir = tmp_path / "run"
    launcher = _Launcher([*TINY, *data_args(stdlib_shards), "train.max_steps=400", "train.step_timeout_seconds=8", "launch.grace_seconds=10",
                          "data.workers=0", f"train.run_dir={run_dir}"])
    frozen = None
    try:
        _wait_for(lambda: _logged_steps(run_dir) >= 5, 180, "5 logged steps")
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
    line = next(line for _, line in launcher.lines if "watchdog: no step finished" in line)
    assert "blame rank 1;" in line and "rank 1: step" in line and "not answering" in line, line
    assert "--- watchdog: Python stacks of rank 0 ---" in (run_dir / "logs" / "rank0.log").read_text()
