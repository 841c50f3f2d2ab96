"""Configs: presets load, overrides apply, and bad input fails early with one clear line."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pretrain.cli import main
from pretrain.config import ConfigError, RunConfig, load_config, reference

TINY = ["configs/models/tiny.yaml", "configs/quickstart.yaml"]


def test_overrides_win_and_types_are_kept():
    cfg = load_config(TINY, ["train.lr=1e-3", "model.num_layers=2", "train.betas=[0.8,0.9]"])
    assert isinstance(cfg, RunConfig)
    assert cfg.train.lr == 1e-3 and cfg.model.num_layers == 2 and cfg.train.betas == [0.8, 0.9]
    assert cfg.model.hidden_size == 64  # from the preset
    assert cfg.data.corpus.endswith("python3.11") or "python3" in cfg.data.corpus  # the stdlib resolver ran


def test_every_key_is_documented():
    lines = reference()
    assert any("train.lr" in line for line in lines)
    assert all(not line.rstrip().endswith(":") for line in lines), [line for line in lines if line.rstrip().endswith(":")]


@pytest.mark.parametrize(
    "override, names",
    [
        ("train.lrr=0.1", ["train.lrr", "unknown"]),
        ("model.num_kv_heads=3", ["model.num_heads=4", "model.num_kv_heads=3", "1, 2, 4"]),
        ("train.lr=-0.1", ["train.lr=-0.1", "positive"]),
        ("data.corpus=/nonexistent/corpus", ["data.corpus=/nonexistent/corpus", "does not exist"]),
        ("train.max_steps=many", ["train.max_steps", "many"]),
        ("data.seq_len=4096", ["data.seq_len=4096", "model.max_seq_len=1024"]),
        ("train.global_batch_size=10", ["train.global_batch_size=10", "micro_batch_size=16"]),
    ],
)
def test_bad_config_fails_with_one_line_naming_key_and_fix(override, names, capsys):
    assert main(["train", *TINY, override]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith("foundry: config error:")
    for name in names:
        assert name in err, (name, err)


def test_layout_that_cannot_split_the_batch_is_rejected():
    from pretrain.config import check_world_size

    cfg = load_config(TINY, ["train.global_batch_size=16", "train.micro_batch_size=4"])
    assert check_world_size(cfg.train, 2) == 2
    with pytest.raises(ConfigError, match="micro_batch_size x data-parallel ranks = 4 x 3"):
        check_world_size(cfg.train, 3)


def test_bad_config_fails_before_deepspeed_is_imported():
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from pretrain.cli import main; rc = main(sys.argv[1:]);"
         "assert 'deepspeed' not in sys.modules; sys.exit(rc)",
         "train", *TINY, "model.num_kv_heads=3"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "num_kv_heads" in proc.stderr
    assert time.perf_counter() - start < 60


def test_missing_config_file():
    with pytest.raises(ConfigError, match="configs/nope.yaml not found"):
        load_config(["configs/nope.yaml"], [])
