"""The layout planner: ZeRO's division rules, the activation formula, known fits, agreement with the
bytes benchmarks/memory.py measured under DeepSpeed, and `foundry plan`'s errors. No subprocesses."""

from __future__ import annotations

import dataclasses
import math

import pytest

from benchmarks.memory import MODEL, REDUCE_BUCKET, planned
from foundry.parallel.planner import (
    GIB,
    HEADROOM,
    PRECISIONS,
    PREFERENCE,
    Layout,
    ModelShape,
    PlanError,
    activation_bytes,
    estimate,
    head_activation_bytes,
    layer_activation_bytes,
    layouts,
    plan,
    preference_key,
    stage_parameters,
)
from foundry.launch.cli import main
from foundry.pretrain.config import load_model_config
from foundry.pretrain.model import num_parameters

PRESETS = ("tiny", "llama2-7b", "llama3-8b", "llama3.2-1b", "llama3-70b")


def preset(name: str):
    return load_model_config(f"configs/models/{name}.yaml")


def bare(params: int) -> ModelShape:
    """A 'model' of `params` parameters: one block of params - 1 and a final norm of width 1, no vocabulary."""
    return ModelShape(hidden=1, heads=1, kv_heads=1, ffn=0, layers=1, vocab=0, tied=False,
                      block_split=params - 1, block_kv=0, block_replicated=0)


# Parameters per rank.


@pytest.mark.parametrize("name", PRESETS)
def test_one_gpu_holds_every_parameter(name):
    cfg = preset(name)
    assert stage_parameters(ModelShape.of(cfg), tp=1, pp=1, stage=0) == num_parameters(cfg)


def test_tensor_parallel_splits_matrices_and_replicates_norms():
    cfg = preset("llama3-8b")  # 8 kv heads: every matrix splits 8 ways
    replicated = cfg.num_layers * 2 * cfg.hidden_size + cfg.hidden_size  # 2 norms per block + the final norm
    per_rank = stage_parameters(ModelShape.of(cfg), tp=8, pp=1, stage=0)
    assert 8 * per_rank == num_parameters(cfg) + 7 * replicated


def test_kv_projections_are_whole_when_fewer_kv_heads_than_tp():
    cfg = preset("tiny")  # 2 kv heads
    shape = ModelShape.of(cfg)
    kv = 2 * cfg.hidden_size * cfg.num_kv_heads * (cfg.hidden_size // cfg.num_heads)
    norms = 2 * cfg.hidden_size
    assert (shape.block_kv, shape.block_replicated) == (kv, norms)
    assert shape.block_parameters(2) == shape.block_split // 2 + kv // 2 + norms  # one kv head per rank
    assert shape.block_parameters(4) == shape.block_split // 4 + kv + norms  # 4 ranks share 2 kv heads: whole


@pytest.mark.parametrize("name,pp", [("llama3-8b", 4), ("llama3.2-1b", 2)])
def test_pipeline_stages_share_the_layers(name, pp):
    cfg = preset(name)
    stages = [stage_parameters(ModelShape.of(cfg), tp=1, pp=pp, stage=i) for i in range(pp)]
    vocab = cfg.vocab_size * cfg.hidden_size
    copy = vocab if cfg.tie_embeddings else 0  # a tied head on the last stage keeps its own copy
    assert sum(stages) == num_parameters(cfg) + copy
    blocks = stages[0] - vocab  # the first stage: its blocks and the embedding
    assert blocks == cfg.num_layers // pp * (num_parameters(cfg, embedding=False) - cfg.hidden_size - (
        0 if cfg.tie_embeddings else vocab)) // cfg.num_layers
    assert stages[-1] == blocks + cfg.hidden_size + vocab  # final norm and head
    assert all(s == blocks for s in stages[1:-1])


# Model states: ZeRO's rules.


@pytest.mark.parametrize("zero,total_gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_figure_1(zero, total_gb):
    # Rajbhandari et al. 2020, figure 1: 7.5B parameters, mixed precision with K = 12 bytes of optimizer
    # state per parameter, 64 data-parallel GPUs.
    m = estimate(bare(7_500_000_000), Layout(dp=64, zero_stage=zero), seq_len=1, precision="bf16", global_batch=64)
    assert (m.params + m.grads + m.optimizer) / 1e9 == pytest.approx(total_gb, abs=0.05)


# Bytes per parameter (params, grads, optimizer) at dp = 4, one micro-batch per step: ZeRO-1 divides
# the optimizer state, ZeRO-2 also the gradients, ZeRO-3 also the weights. fp32 under ZeRO >= 1 has
# 12 bytes of optimizer state, not 8: DeepSpeed steps a separate fp32 copy of the partition (measured).
BYTES_PER_PARAM_DP4 = {
    ("bf16", 0): (2, 2, 12), ("bf16", 1): (2, 2, 3), ("bf16", 2): (2, 0.5, 3), ("bf16", 3): (0.5, 0.5, 3),
    ("fp32", 0): (4, 4, 8), ("fp32", 1): (4, 4, 3), ("fp32", 2): (4, 1, 3), ("fp32", 3): (1, 1, 3),
}


@pytest.mark.parametrize("precision,zero", sorted(BYTES_PER_PARAM_DP4))
def test_zero_divides_states_by_dp(precision, zero):
    n = 1_000_000
    m = estimate(bare(n), Layout(dp=4, zero_stage=zero), seq_len=1, precision=precision, global_batch=4)
    assert (m.params / n, m.grads / n, m.optimizer / n) == BYTES_PER_PARAM_DP4[precision, zero]


def test_zero2_holds_two_gradient_partitions_when_accumulating():
    # DeepSpeed's ZeRO-2 keeps the partition accumulated so far and reduces the current micro-batch's
    # into a second one (measured); without a global batch the planner assumes accumulation.
    n, layout = 1_000_000, Layout(dp=4, zero_stage=2)
    one = estimate(bare(n), layout, seq_len=1, global_batch=4).grads
    assert estimate(bare(n), layout, seq_len=1, global_batch=8).grads == 2 * one
    assert estimate(bare(n), layout, seq_len=1).grads == 2 * one
    assert estimate(bare(n), Layout(dp=4, zero_stage=1), seq_len=1, global_batch=8).grads == 2 * n  # whole, bf16


def test_zero_buffers():
    # DeepSpeed allocates its whole 5e8-element reduce bucket under ZeRO >= 1, however small the model
    # (measured: 2000 MB in fp32 for a 27M-parameter model).
    assert estimate(bare(10), Layout(dp=2, zero_stage=0), 1, "fp32").bucket == 0
    assert estimate(bare(10), Layout(dp=2, zero_stage=1), 1, "fp32").bucket == 2e9
    assert estimate(bare(10), Layout(dp=2, zero_stage=2), 1, "bf16").bucket == 1e9
    assert estimate(bare(10), Layout(dp=2, zero_stage=2), 1, "bf16", reduce_bucket=1000).bucket == 2000
    # ZeRO-3 gathers whole weights: the block computed and the one prefetched (bf16: 2 bytes each).
    shape = ModelShape.of(preset("llama3-8b"))  # its head (525M) outweighs a block (218M)
    assert estimate(shape, Layout(dp=8, zero_stage=3), 1, "bf16").gathered == 2 * 2 * shape.vocab_parameters(1)
    assert estimate(shape, Layout(dp=8, zero_stage=2), 1, "bf16").gathered == 0


# Activations: Korthikanti et al. 2022's accounting, applied to this model's ops.

# Bytes one bf16 block kept for backward on an H100 (torch 2.11, SDPA; `benchmarks/memory.py
# --activations`, benchmarks/RESULTS.md), per s*b*h at s=4096, b=2, for Llama 3 8B's block with
# other kv heads and MLP widths: (kv_heads, ffn) -> bytes / sbh.
MEASURED_BLOCK = {(8, 14336): 50.033, (32, 14336): 52.033, (8, 11008): 42.533, (32, 11008): 45.533, (8, 8192): 37.033}


@pytest.mark.parametrize("kv,ffn", sorted(MEASURED_BLOCK))
def test_block_activations_match_an_h100(kv, ffn):
    cfg = dataclasses.replace(preset("llama3-8b"), num_kv_heads=kv, ffn_hidden_size=ffn)
    s, b, h = 4096, 2, cfg.hidden_size
    stored, kept = layer_activation_bytes(ModelShape.of(cfg), Layout(micro_batch=b), s, attention_scores=False)
    assert stored / (s * b * h) == 20 + 4 * kv / cfg.num_heads + 8 * ffn / h
    assert stored / (s * b * h) == pytest.approx(MEASURED_BLOCK[kv, ffn], rel=0.025)
    assert kept == 2 * s * b * h


def test_block_activations_split_like_korthikanti():
    shape = ModelShape.of(preset("llama3-70b"))  # 64 heads, 8 kv heads, ffn 28672
    s, b, h, a, t = 4096, 2, 8192, 64, 8
    sbh, inner = s * b * h, 4 + 4 * 8 / a + 8 * 28672 / h  # attention and MLP internals
    scores = 5 * a * s / h
    plain = layer_activation_bytes(shape, Layout(micro_batch=b), s, True)
    tp_only = layer_activation_bytes(shape, Layout(tp=t, micro_batch=b, sequence_parallel=False), s, True)
    with_sp = layer_activation_bytes(shape, Layout(tp=t, micro_batch=b, sequence_parallel=True), s, True)
    assert plain == (sbh * (12 + 4 + inner + scores), 2 * sbh)
    # Tensor parallelism divides what lives inside attention and the MLP; sequence parallelism also the
    # norms and the checkpointed input. The gathered inputs of the column-parallel layers stay whole.
    assert tp_only == (pytest.approx(sbh * (12 + 4 + (inner + scores) / t)), 2 * sbh)
    assert with_sp == (pytest.approx(sbh * (12 / t + 4 + (inner + scores) / t)), 2 * sbh / t)
    # Fused attention kernels store no s x s scores: the 5as/h term goes.
    assert layer_activation_bytes(shape, Layout(micro_batch=b), s, False)[0] == sbh * (16 + inner)


def test_checkpointing_keeps_block_inputs_and_one_rebuilt_block():
    shape = ModelShape.of(preset("llama3-8b"))
    s, b, h, L, V = 2048, 1, 4096, 32, 128256
    sbh = s * b * h
    stored, kept = 49 * sbh, 2 * sbh
    head = 8 * sbh + s * b * V * 4  # final norm and head input, then the fp32 log-probabilities
    bf16 = PRECISIONS["bf16"]

    def act(checkpointing: str) -> float:
        return activation_bytes(shape, Layout(micro_batch=b, checkpointing=checkpointing), s, bf16, 0, 1)

    assert act("off") == L * stored + head
    assert act("full") == L * kept + stored + head
    assert act("selective") == (L // 2) * kept + (L // 2) * stored + stored + head  # blocks 0, 2, 4, ...
    assert activation_bytes(shape, Layout(micro_batch=b), s, PRECISIONS["fp32"], 0, 1) == 2 * (L * stored + 8 * sbh) \
        + s * b * V * 4


def test_first_pipeline_stage_keeps_pp_micro_batches_of_its_layers():
    # With 1F1B, stage 0 of pp holds pp micro-batches of L/pp layers: as many as the whole model holds
    # for one micro-batch without pipelining (Korthikanti et al. 2022, section 4.2.3).
    shape = ModelShape.of(preset("llama3-8b"))
    bf16, s = PRECISIONS["bf16"], 2048
    blocks = shape.layers * layer_activation_bytes(shape, Layout(), s, False)[0]
    head = sum(head_activation_bytes(shape, Layout(), s))
    assert activation_bytes(shape, Layout(), s, bf16, stage=0, in_flight=1) == blocks + head
    assert activation_bytes(shape, Layout(pp=4), s, bf16, stage=0, in_flight=4) == blocks
    assert activation_bytes(shape, Layout(pp=4), s, bf16, stage=3, in_flight=1) == blocks / 4 + head
    # With fewer micro-batches per step than stages, fewer are in flight.
    two = estimate(shape, Layout(pp=4, dp=1, micro_batch=1), s, "bf16", global_batch=2)
    assert two.activations == pytest.approx(2 * blocks / 4)


# Agreement with DeepSpeed: rank 0's bytes measured by benchmarks/memory.py (fp32 on CPU, DeepSpeed
# 0.19.8, 2 micro-batches per step, a reduce bucket smaller than the model; benchmarks/RESULTS.md)
# for its 26.7M-parameter model, as (params, grads, optimizer) in bytes.
MEASURED = {  # (zero, dp): bytes
    (0, 1): (106_982_400, 106_982_400, 213_964_956),
    (0, 4): (106_982_400, 106_982_400, 213_964_956),
    (1, 4): (106_982_400, 106_982_400, 80_236_808),
    (2, 1): (106_982_400, 213_964_800, 320_947_208),
    (2, 4): (106_982_400, 55_068_672, 80_236_808),
    (3, 4): (26_773_248, 26_745_600, 80_236_808),
}


def test_measured_bytes_derive_from_the_parameter_count():
    # The hard-coded numbers are what the formula says: 4 bytes per fp32 parameter; 8 (ZeRO-0) or 12
    # (ZeRO >= 1: DeepSpeed's own fp32 copy) bytes of optimizer state; ZeRO-2's two gradient partitions
    # while accumulating; each divided by dp where ZeRO partitions it. What is left is AdamW's 4-byte
    # `step` per tensor it steps, the norms ZeRO-3 keeps whole and partitions cut through parameters.
    n = num_parameters(MODEL)
    assert MEASURED[0, 1][:2] == (4 * n, 4 * n) and 0 < MEASURED[0, 1][2] - 8 * n < 1000
    assert 0 < MEASURED[1, 4][2] - 12 * n // 4 < 1000
    assert MEASURED[2, 1][1] == 2 * 4 * n
    assert MEASURED[3, 4][1] == 4 * n // 4
    assert MEASURED[3, 4][0] - 4 * n // 4 == 4 * (2 * MODEL.num_layers + 1) * MODEL.hidden_size  # whole norms


@pytest.mark.parametrize("zero,dp", sorted(MEASURED))
def test_planner_matches_measured_deepspeed_bytes(zero, dp):
    m = planned(zero, dp)
    # ZeRO-2's accumulated gradients cover whole parameters that straddle the partition: 3% here.
    tolerance = 0.035 if zero == 2 and dp > 1 else 0.002
    for planned_bytes, measured in zip((m.params, m.grads, m.optimizer), MEASURED[zero, dp]):
        assert measured == pytest.approx(planned_bytes, rel=tolerance)
    assert m.bucket == (4 * REDUCE_BUCKET if zero else 0)  # measured: 4 MB (2000 MB with DeepSpeed's default)


# Enumeration and the pick.


def test_llama3_8b_fits_8_h100s_without_model_parallelism():
    result = plan(preset("llama3-8b"), gpus=8, gpu_memory_gib=80, model_name="llama3-8b")
    layout, memory = result.pick
    assert memory.total <= 80 * GIB * (1 - HEADROOM)
    assert (layout.tp, layout.pp, layout.dp) == (1, 1, 8)
    assert all(m.total <= 80 * GIB * (1 - HEADROOM) for _, m in result.fits)
    assert [preference_key(l) for l, _ in result.fits] == sorted(preference_key(l) for l, _ in result.fits)


def test_llama3_70b_does_not_fit_8_gpus_of_16_gib():
    with pytest.raises(PlanError, match=r"^no layout of llama3-70b fits 8 x 16 GiB .*use more GPUs or more memory"):
        plan(preset("llama3-70b"), gpus=8, gpu_memory_gib=16, model_name="llama3-70b")


def test_pick_rule_prefers_data_parallelism_then_no_zero3():
    # 70B on 64 x 80 GiB fits with ZeRO-3 and no model parallelism: the rule's first criterion wins.
    layout, _ = plan(preset("llama3-70b"), gpus=64, gpu_memory_gib=80).pick
    assert layout.tp * layout.pp == 1 and layout.zero_stage == 3
    # A 1B model fits whole with room to spare: no recomputation, the largest micro-batch, then the
    # lowest ZeRO stage (the last criterion).
    layout, _ = plan(preset("llama3.2-1b"), gpus=8, gpu_memory_gib=80, seq_len=2048).pick
    assert (layout.tp, layout.pp, layout.checkpointing, layout.micro_batch, layout.zero_stage) == (1, 1, "off", 8, 0)
    assert PREFERENCE[0][0].startswith("fewer model-parallel GPUs")


def test_layouts_respect_node_size_heads_and_pipeline_zero_limit():
    cfg = preset("llama3-70b")
    found = list(layouts(cfg, gpus=64))
    assert found and all(l.gpus == 64 for l in found)
    assert {l.tp for l in found} == {1, 2, 4, 8}
    assert all(cfg.num_layers % l.pp == 0 for l in found)
    assert all(l.zero_stage <= 1 for l in found if l.pp > 1)
    assert all(l.zero_stage == 0 for l in found if l.dp == 1)
    assert all(256 % (l.micro_batch * l.dp) == 0 for l in layouts(cfg, gpus=64, global_batch=256))


# The command line.


def test_cli_prints_the_table_and_the_pick(capsys):
    assert main(["plan", "configs/models/llama3-8b.yaml", "--gpus", "8", "--gpu-memory-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "tp  pp   dp zero micro" in out and "\npick: tp 1 x pp 1 x dp 8" in out and "\nwhy: " in out
    rows = [line for line in out.splitlines() if line[:2] in ("* ", "  ") and line.split()[-1][0].isdigit()]
    assert len(rows) > 1 and len(rows) <= 15


@pytest.mark.parametrize("args,message", [
    (["configs/models/llama3-70b.yaml", "--gpus", "8", "--gpu-memory-gib", "16"],
     "no layout of llama3-70b fits 8 x 16 GiB"),
    (["configs/models/llama3-8b.yaml", "--gpus", "0", "--gpu-memory-gib", "80"], "--gpus=0 must be positive"),
    (["configs/models/llama3-8b.yaml", "--gpus", "8", "--gpu-memory-gib", "-1"],
     "--gpu-memory-gib=-1.0 must be positive"),
    (["configs/models/llama3-8b.yaml", "--gpus", "8", "--gpu-memory-gib", "80", "--seq-len", "100000"],
     "exceeds model.max_seq_len=8192"),
    (["configs/models/llama3-8b.yaml", "--gpus", "8", "--gpu-memory-gib", "80", "--global-batch", "0"],
     "--global-batch=0 must be positive"),
    (["configs/models/llama3-8b.yaml", "--gpus", "6", "--gpu-memory-gib", "80", "--global-batch", "4"],
     "no layout splits the global batch; pass a multiple of --gpus, e.g. --global-batch 48"),
])
def test_cli_bad_arguments_exit_2_with_one_line(capsys, args, message):
    assert main(["plan", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], captured.err


def test_planner_rounds_vocab_up_to_a_multiple_of_tp():
    shape = ModelShape.of(preset("tiny"))  # vocab 512
    odd = ModelShape(**{**shape.__dict__, "vocab": 513})
    assert odd.vocab_parameters(2) == math.ceil(513 / 2) * shape.hidden
