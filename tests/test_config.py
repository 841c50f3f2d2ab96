"""Configs: presets load, overrides apply, and bad input fails early with one clear line."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from foundry.launch.cli import main
from foundry.pretrain.config import ConfigError, RunConfig, load_config, reference
from tests.conftest import data_args


@pytest.fixture
def tiny_args(stdlib_shards) -> list[str]:
    return ["configs/models/tiny.yaml", "configs/quickstart.yaml", *data_args(stdlib_shards)]


def test_overrides_win_and_types_are_kept(tiny_args):
    cfg = load_config(tiny_args[:2], [*tiny_args[2:], "train.lr=1e-3", "model.num_layers=2", "train.betas=[0.8,0.9]"])
    assert isinstance(cfg, RunConfig)
    assert cfg.train.lr == 1e-3 and cfg.model.num_layers == 2 and cfg.train.betas == [0.8, 0.9]
    assert cfg.model.hidden_size == 64  # from the preset
    assert cfg.data.datasets[0].weight == 1.0 and cfg.data.streams == 4


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
        ("data.datasets=[{path: /nonexistent/corpus}]", ["data.datasets[0].path=/nonexistent/corpus", "prepare-data"]),
        ("data.streams=3", ["train.global_batch_size=32", "data.streams=3"]),
        ("train.max_steps=many", ["train.max_steps", "many"]),
        ("data.seq_len=4096", ["data.seq_len=4096", "model.max_seq_len=1024"]),
        ("train.global_batch_size=10", ["train.global_batch_size=10", "micro_batch_size=16"]),
    ],
)
def test_bad_config_fails_with_one_line_naming_key_and_fix(override, names, capsys, tiny_args):
    assert main(["train", *tiny_args, override]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith("foundry: config error:")
    for name in names:
        assert name in err, (name, err)


def test_layout_that_cannot_split_the_batch_is_rejected(tiny_args):
    from foundry.pretrain.config import check_world_size

    cfg = load_config(tiny_args[:2], [*tiny_args[2:], "train.global_batch_size=16", "train.micro_batch_size=4"])
    assert check_world_size(cfg.train, 2) == 2
    with pytest.raises(ConfigError, match="micro_batch_size x data-parallel ranks = 4 x 3"):
        check_world_size(cfg.train, 3)


def test_bad_config_fails_before_deepspeed_is_imported(tiny_args):
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from foundry.launch.cli import main; rc = main(sys.argv[1:]);"
         "assert 'deepspeed' not in sys.modules; sys.exit(rc)",
         "train", *tiny_args, "model.num_kv_heads=3"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "num_kv_heads" in proc.stderr
    assert time.perf_counter() - start < 60


def test_missing_config_file():
    with pytest.raises(ConfigError, match="configs/nope.yaml not found"):
        load_config(["configs/nope.yaml"], [])
