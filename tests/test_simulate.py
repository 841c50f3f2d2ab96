"""`foundry simulate`: one rank of a cluster job run in this process on the fake process group, its bytes set next
to the planner's. A rank that fits here is built for real and its DeepSpeed engine stepped; one that does not is
built with fake tensors (no memory) and counted. Either way the code that runs is the trainer's own build."""

from __future__ import annotations

import pytest

from foundry.launch.cli import main
from foundry.pretrain.config import load_config
from foundry.pretrain.simulate import CATEGORIES, default_ranks, simulate

TINY = ["configs/models/tiny.yaml", "configs/quickstart.yaml"]
# tp 2 x pp 2 x dp 2 of tiny, bf16, 4 micro-batches per step: every kind of parallelism, small enough to be real.
SPLIT = ["launch.procs_per_node=8", "parallel.tensor=2", "parallel.pipeline=2", "parallel.sequence_parallel=true",
         "train.precision=bf16", "train.global_batch_size=16", "train.micro_batch_size=2", "data.seq_len=128"]


def _within(report, tolerance: float = 0.05) -> None:
    for key in CATEGORIES:
        got, planned = report.got[key], report.planned[key]
        assert got == pytest.approx(planned, rel=tolerance, abs=1024), (report.rank, key, got, planned)


def test_a_rank_that_fits_is_built_and_stepped_for_real_and_matches_the_plan():
    report = simulate(load_config(TINY, ["launch.procs_per_node=2"]), rank=1)
    assert report.mode == "measured" and report.steps == 2 and report.optimizer == "BF16_Optimizer"  # auto: a GPU's bf16
    assert report.coordinates == {"tp": 0, "pp": 0, "dp": 1}
    assert all(how == "measured" for how in report.how.values())
    _within(report)


def test_fake_tensors_count_what_real_ones_hold():
    """The same pipeline rank, built for real and built fake: the same parameters and the same activations."""
    cfg = load_config(TINY, SPLIT)
    real, fake = simulate(cfg, rank=5), simulate(cfg, rank=5, measure_if_fits=False)
    assert (real.mode, fake.mode) == ("measured", "counted")
    assert real.coordinates == fake.coordinates == {"tp": 1, "pp": 1, "dp": 0}
    assert real.parameters == fake.parameters
    assert real.got == fake.got
    _within(fake)


@pytest.mark.parametrize("rank", [0, 64, 127])
def test_the_70b_job_of_the_readme_is_counted_rank_by_rank_within_5_percent_of_the_plan(rank):
    """configs/llama3-70b-16x8.yaml: tp 8 x pp 4 x dp 4 on 128 GPUs; the first, a middle and the last stage."""
    cfg = load_config(["configs/models/llama3-70b.yaml", "configs/llama3-70b-16x8.yaml"], [])
    assert default_ranks(cfg) == [0, 64, 96]
    report = simulate(cfg, rank)
    assert report.mode == "counted" and report.world == 128
    assert report.coordinates["pp"] == rank // 32
    _within(report)


def test_a_rank_outside_the_world_is_refused_in_one_line(capsys):
    assert main(["simulate", *TINY, "launch.procs_per_node=2", "--rank", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "foundry: config error: --rank 2 is outside the world of 2 ranks (launch.nodes x " \
                  "launch.procs_per_node): pass 0-1"


def test_the_command_prints_each_ranks_table(capsys):
    assert main(["simulate", "configs/models/llama3-8b.yaml", "configs/llama3-8b-2x8.yaml", "--rank", "15"]) == 0
    out = capsys.readouterr().out
    assert "rank 15 of 16: tp 1, pp 3, dp 1 of tp 2 x pp 4 x dp 2 | blocks 25-31" in out
    for key in (*CATEGORIES, "total"):
        assert f"\n  {key} " in out
