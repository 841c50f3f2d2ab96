"""3D parallelism proven by equivalence: every layout trains the same model to the same losses
and the same final weights as one process, with the same seed, data and global batch.

Tolerance: fp32 on CPU; layouts differ only in the order of floating-point sums (all-reduces,
sharded matmuls), which moves losses by ~1e-7 relative. We require < 1e-4 relative for losses and
grad norms. For the final weights after 10 AdamW steps we require, per tensor, a difference of
< 1e-4 relative in norm and < 1e-4 in any element: most elements agree to ~1e-7, but Adam divides
by sqrt(v) + eps, so an embedding row whose token appeared once has a gradient near eps and its
update magnifies round-off (seen: one row off by 5e-5, 1.5e-5 of the
embedding's norm, under tensor parallelism and ZeRO-3; every other tensor within 2e-7).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from foundry.parallel.layout import Layout, LayoutError
from foundry.pretrain.config import load_config, load_model_config
from tests.conftest import data_args, read_metrics, torchrun

STEPS = 10
COMMON = [
    "configs/models/tiny.yaml", "configs/quickstart.yaml", f"train.max_steps={STEPS}", "train.global_batch_size=8",
    "train.micro_batch_size=2", "train.warmup_steps=3", "data.seq_len=64", "tracking.log_interval=1",
    "checkpoint.save_consolidated=true",
]

# name: (processes, overrides). tiny has 4 query heads and 2 kv heads.
LAYOUTS = {
    "tp2": (2, ["parallel.tensor=2"]),
    "pp2_selective_ckpt": (2, ["parallel.pipeline=2", "parallel.activation_checkpointing=selective"]),
    "dp2_zero1": (2, ["parallel.zero_stage=1"]),
    "tp2_pp2_full_ckpt": (4, ["parallel.tensor=2", "parallel.pipeline=2", "parallel.activation_checkpointing=full"]),
    "tp2_dp2_seq_parallel": (4, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "pp2_dp2": (4, ["parallel.pipeline=2"]),
    "dp2_zero2": (2, ["parallel.zero_stage=2"]),
    "dp2_zero3_full_ckpt": (2, ["parallel.zero_stage=3", "parallel.activation_checkpointing=full"]),
    "tp4_replicated_kv": (4, ["parallel.tensor=4", "parallel.sequence_parallel=true"]),  # 2 kv heads < 4 ranks
}


def _run(root: Path, name: str, nproc: int, extra: list[str], shards: Path) -> Path:
    run_dir = root / name
    torchrun(nproc, [*COMMON, *data_args(shards), *extra, f"train.run_dir={run_dir}"])
    return run_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stdlib_shards) -> Path:
    return _run(tmp_path_factory.mktemp("parallel"), "single", 1, [], stdlib_shards)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference, tmp_path, stdlib_shards):
    nproc, extra = LAYOUTS[name]
    run_dir = _run(tmp_path, name, nproc, extra, stdlib_shards)
    ref, got = read_metrics(reference), read_metrics(run_dir)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (name, a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (name, a, b)
    assert ref[-1]["loss"] < ref[0]["loss"] - 0.2  # it learned something, so equal losses mean something

    ref_weights, weights = torch.load(reference / "model.pt"), torch.load(run_dir / "model.pt")
    assert weights.keys() == ref_weights.keys()
    for key, value in ref_weights.items():
        assert weights[key].shape == value.shape, key
        diff = (weights[key] - value).abs()
        assert diff.norm() / value.norm() < 1e-4 and diff.max() < 1e-4, (name, key, diff.norm().item(), diff.max().item())


def test_consolidated_weights_load_into_the_plain_model(reference):
    from foundry.pretrain.model import Llama

    cfg = load_model_config("configs/models/tiny.yaml")
    model = Llama(cfg)
    model.load_state_dict(torch.load(reference / "model.pt"))  # strict: every key, every shape
    fresh = Llama(cfg).state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in model.state_dict().items())  # it was trained




@pytest.mark.parametrize(
    "world, overrides, message",
    [
        (6, ["parallel.tensor=4"], "world size 6 is not divisible by parallel.tensor x parallel.pipeline = 4 x 1"),
        (8, ["parallel.tensor=8"], "model.num_heads=4 is not divisible by parallel.tensor=8"),
        (8, ["parallel.pipeline=8"], "parallel.pipeline=8 exceeds model.num_layers=4"),
        (4, ["parallel.pipeline=2", "parallel.zero_stage=3"], "supports ZeRO 0 and 1 only; use parallel.zero_stage=1"),
        (2, ["parallel.sequence_parallel=true"], "needs parallel.tensor > 1"),
    ],
)
def test_bad_layouts_fail_with_numbers_and_an_alternative(world, overrides, message, stdlib_shards):
    cfg = load_config(["configs/models/tiny.yaml", "configs/quickstart.yaml"], [*overrides, *data_args(stdlib_shards)])
    with pytest.raises(LayoutError) as e:
        Layout.from_config(cfg.parallel, cfg.model, world)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_good_layout_derives_data_parallel_size(stdlib_shards):
    cfg = load_config(["configs/models/tiny.yaml", "configs/quickstart.yaml"],
                      ["parallel.tensor=2", "parallel.pipeline=2", *data_args(stdlib_shards)])
    assert Layout.from_config(cfg.parallel, cfg.model, 16) == Layout(tp=2, pp=2, dp=4)


def test_bad_layout_stops_the_cli_before_any_process_group(monkeypatch, capsys, stdlib_shards):
    import torch.distributed as dist

    from foundry.launch.cli import main

    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["train", "configs/models/tiny.yaml", "configs/quickstart.yaml", "parallel.tensor=2",
                 *data_args(stdlib_shards)]) == 2
    assert "world size 3 is not divisible" in capsys.readouterr().err
    assert not dist.is_initialized()
