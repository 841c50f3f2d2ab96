"""Shared inputs are untrusted: checkpoints load without running code, manifests name only their own shards,
config values rendered into batch scripts stay text, the run directory is not open to every user."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from foundry.launch.slurm import LaunchError, render_script
from foundry.pretrain.checkpoint import MARKER, checksum, tag_for
from foundry.pretrain.config import load_config
from tests.conftest import data_args, foundry, torchrun

BASE = ["configs/models/tiny.yaml", "configs/quickstart.yaml", "train.global_batch_size=4", "train.micro_batch_size=4",
        "train.warmup_steps=1", "data.seq_len=64", "tracking.log_interval=1", "checkpoint.resume=true"]


def _config(overrides: list[str]):
    return load_config([a for a in BASE if "=" not in a], [*(a for a in BASE if "=" in a), *overrides])


class Payload:
    """Unpickling this runs a shell command, as a hostile checkpoint file would."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _plant(tag_dir: Path, name: str, marker: Path) -> None:
    """Replace one file of a checkpoint by a payload that would create `marker`, and fix up the size and checksum
    its COMPLETE.json records: whoever can write the files can write those too."""
    torch.save({"state": Payload(f"touch {marker}")}, tag_dir / name)
    info = json.loads((tag_dir / MARKER).read_text())
    info["files"][name] = list(checksum(tag_dir / name))
    (tag_dir / MARKER).write_text(json.dumps(info))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, stdlib_shards) -> Path:
    run_dir = tmp_path_factory.mktemp("untrusted") / "run"
    torchrun(1, [*BASE, *data_args(stdlib_shards), "train.max_steps=2", f"train.run_dir={run_dir}"])
    return run_dir


@pytest.mark.parametrize("name", ["rng_rank00000.pt", "mp_rank_00_model_states.pt",
                                  "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_checkpoint_carrying_a_pickle_payload_is_refused_and_the_payload_never_runs(
        saved, stdlib_shards, tmp_path, name):
    run_dir = tmp_path / "run"
    shutil.copytree(saved, run_dir)
    marker = tmp_path / "PWNED"
    _plant(run_dir / "checkpoints" / tag_for(2), name, marker)
    proc = torchrun(1, [*BASE, *data_args(stdlib_shards), "train.max_steps=3", f"train.run_dir={run_dir}"],
                    check=False)
    assert proc.returncode != 0
    assert f"foundry: checkpoint error: {run_dir / 'checkpoints' / tag_for(2) / name} holds a Python object " \
           "(posix.system) that loading would have to run code for: refused" in proc.stderr
    assert not marker.exists()


def test_generate_refuses_a_planted_optimizer_file(saved, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(saved, run_dir)
    marker = tmp_path / "PWNED"
    _plant(run_dir / "checkpoints" / tag_for(2), "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)  # weights
    proc = foundry(["generate", str(run_dir), "--prompt", "def "])
    assert proc.returncode == 2 and "that loading would have to run code for: refused" in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("url", ["pipe:touch {marker}", "../elsewhere/shard-000000.tar", "/etc/shard.tar",
                                 "http://host/shard.tar"])
def test_a_manifest_may_name_only_shard_files_next_to_it(stdlib_shards, tmp_path, url):
    marker = tmp_path / "PWNED"
    data = tmp_path / "data"
    shutil.copytree(stdlib_shards, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["shards"][0]["url"] = url.format(marker=marker)
    (data / "manifest.json").write_text(json.dumps(manifest))
    proc = foundry(["train", *BASE, *data_args(data), f"train.run_dir={tmp_path / 'run'}"])
    assert proc.returncode == 2
    assert "is not the name of a tar file next to the manifest" in proc.stderr and "\n" not in proc.stderr.strip()
    assert not marker.exists()


def test_hostile_names_and_paths_stay_text_in_the_batch_script(slurm, stdlib_shards, tmp_path):
    marker = "PWNED"
    run_dir = tmp_path / "O'Brien's runs #1 $(touch PWNED2) `touch PWNED3`"
    cfg = _config([*data_args(stdlib_shards), "launch.slurm.partition=cpu", "launch.slurm.gpus=false",
                   "launch.procs_per_node=1"])
    cfg.train.run_dir, cfg.launch.slurm.job_name = str(run_dir), f"x$(touch {marker})"  # no YAML quoting needed
    script = tmp_path / "job.sbatch"
    script.write_text(render_script(cfg, run_dir / "config.yaml", tmp_path))
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # Run as a plain script with srun and scontrol stubbed out: nothing may be created.
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for tool in ("srun", "scontrol"):
        (stubs / tool).write_text("#!/bin/sh\nexit 0\n")
        (stubs / tool).chmod(0o755)
    before = set(tmp_path.rglob("*"))
    subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, timeout=120,
                   env={**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_JOB_ID": "1"})
    assert not list(tmp_path.rglob("PWNED*")) and set(tmp_path.rglob("*")) == before
    # sbatch reads the directives back verbatim.
    submitted = subprocess.run(["sbatch", "--hold", "--parsable", str(script)], capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    subprocess.run(["scancel", job])
    assert f"JobName=x$(touch {marker})" in shown and f"WorkDir={tmp_path}" in shown
    assert f"StdOut={run_dir}/slurm-{job}.out" in shown


def test_values_a_batch_script_cannot_carry_are_refused_with_one_line(stdlib_shards, tmp_path):
    cfg = _config(data_args(stdlib_shards))
    cfg.launch.slurm.job_name = "a\nrm -rf ~"
    with pytest.raises(LaunchError, match="contains a line break or control character, which a batch script"):
        render_script(cfg, tmp_path / "config.yaml", tmp_path)
    cfg.launch.slurm.job_name = """it's "quoted" """
    with pytest.raises(LaunchError, match="has both kinds of quote or a backslash"):
        render_script(cfg, tmp_path / "config.yaml", tmp_path)


def test_the_run_directory_is_not_open_to_every_user_and_files_follow_the_umask(stdlib_shards, tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    proc = foundry(["train", *BASE, *data_args(stdlib_shards), f"train.run_dir={open_dir}"])
    assert proc.returncode == 2 and "is writable by every user (mode 777)" in proc.stderr
    run_dir = tmp_path / "run"
    old = os.umask(0o027)
    try:
        torchrun(1, [*BASE, *data_args(stdlib_shards), "train.max_steps=2", f"train.run_dir={run_dir}"])
    finally:
        os.umask(old)
    written = [p for p in run_dir.rglob("*")]
    assert len(written) > 10 and not [p for p in written if stat.S_IMODE(p.stat().st_mode) & 0o007]
