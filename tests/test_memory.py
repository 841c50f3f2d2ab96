"""A rank's bytes by category (foundry.pretrain.memory), checked against what they count: DeepSpeed's rules
against the census of real engines, the measured activations against the planner's per-block accounting and
the 1F1B schedule. Every rank is rank 0 of a fake world of WORLD processes (torch's fake process group: the
collectives move nothing, the tensors have the real rank's shapes); the large models run under FakeTensorMode,
where tensors have shapes and no memory."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from foundry.parallel.layout import Layout
from foundry.parallel.planner import (
    Candidate,
    ModelShape,
    estimate,
    head_activation_bytes,
    layer_activation_bytes,
)
from foundry.parallel.tensor import apply_tensor_parallel
from foundry.pretrain import simulate
from foundry.pretrain.config import ModelConfig, ParallelConfig, TrainConfig
from foundry.pretrain.engine import deepspeed_config
from foundry.pretrain.memory import SavedTensors, engine_bytes, stage_activations
from foundry.pretrain.model import Llama
from tests.conftest import preset

WORLD = 24  # tp up to 8; dp 24 cuts the flat parameter groups and ZeRO-3's parameters with padding


@pytest.fixture(scope="module")
def fake_world():
    """This process as rank 0 of WORLD, for DeepSpeed and for tensor-parallel groups."""
    with simulate.fake_world(0, WORLD):
        yield


def sliced(cfg: ModelConfig, tp: int, sequence_parallel: bool = False) -> tuple[Llama, object]:
    """Rank 0's tensor-parallel slice of `cfg` on the meta device (no memory), and its loss function."""
    with torch.device("meta"):
        model = Llama(cfg)
    loss_fn = apply_tensor_parallel(model, dist.new_group(list(range(tp))), sequence_parallel) if tp > 1 else None
    return model, loss_fn


def materialized(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model`'s parameters (in `dtype`, attributes kept) and buffers given memory: zeros, fake tensors inside a
    FakeTensorMode (no memory), real ones elsewhere."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None:
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(torch.zeros(p.shape, dtype=dtype))
                    made[id(p)].__dict__.update(p.__dict__)  # tensor-parallel flags
                module._parameters[key] = made[id(p)]
        for key, b in module._buffers.items():
            if b is not None:
                module._buffers[key] = torch.zeros(b.shape, dtype=b.dtype)
    return model


# DeepSpeed's rules against real engines. The model is small (1.7M parameters) and sized so that each rule
# shows: the embedding and head (262k elements) and the MLP matrices (131k) are over the reduce bucket and
# ZeRO-3's persistence threshold (1e5), attention's matrices and the norms under both.

SMALL = ModelConfig(vocab_size=1024, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                    ffn_hidden_size=512, max_seq_len=64)
BUCKET = 100_000  # elements: smaller than the model, as DeepSpeed's 5e8 default is for any model worth a GPU

# (ZeRO stage, precision, gradient accumulation, tp): the configs engine.deepspeed_config renders (fp32; bf16
# accumulating in fp32), then DeepSpeed's default of accumulating in the model's dtype (bf16), which takes its
# other optimizer wrappers, and tensor parallelism through the topology as the trainer passes it.
ENGINES = [(z, "fp32", "config", 1) for z in range(4)] + [(z, "bf16", "config", 1) for z in (1, 2, 3)] \
    + [(z, "bf16", "bf16", 1) for z in range(4)] + [(2, "bf16", "config", 2), (3, "fp32", "config", 2)]


def rendered(zero: int, precision: str, accumulation: str, dp: int, tp: int = 1) -> dict:
    from benchmarks.memory import ACCUMULATION, MICRO_BATCH

    train = TrainConfig(global_batch_size=MICRO_BATCH * dp * ACCUMULATION, micro_batch_size=MICRO_BATCH,
                        max_steps=10, warmup_steps=1)
    # Our config refuses bf16 without ZeRO (it would accumulate in bf16): render ZeRO-1's, then ask for 0.
    ds_config = deepspeed_config(train, ParallelConfig(tensor=tp, zero_stage=max(zero, 1)), ACCUMULATION, precision)
    ds_config["zero_optimization"] = {"stage": zero, "reduce_bucket_size": BUCKET}
    if accumulation != "config":
        ds_config.pop("data_types", None)
    return ds_config


@pytest.mark.parametrize("zero,precision,accumulation,tp", ENGINES)
def test_engine_bytes_match_a_deepspeed_engine(fake_world, zero, precision, accumulation, tp):
    """The census of a real engine over two steps of two micro-batches (benchmarks/memory.py's `measure`:
    gradients and bucket at their most during backward) equals the count, to the byte. The count's parameters
    also hold the flat groups' padding (under 2 x dp elements a group), which the census, counting each
    weight's own elements, does not see."""
    from benchmarks.memory import measure
    from foundry.parallel.topology import Topology
    from foundry.pretrain.engine import initialize
    from foundry.pretrain.kernels import cross_entropy

    topology = Topology(Layout(tp=tp, dp=WORLD // tp))
    ds_config = rendered(zero, precision, accumulation, WORLD // tp, tp)
    torch.manual_seed(0)
    model = Llama(SMALL)
    loss_fn = cross_entropy
    if tp > 1:
        loss_fn = apply_tensor_parallel(model, topology.get_tensor_model_parallel_group())
    counted = engine_bytes(model, ds_config, dp=WORLD // tp, dp_rank=topology.dp_rank)  # before DeepSpeed flattens it
    engine = initialize(model, ds_config, mpu=topology)
    assert type(engine.optimizer).__name__ == counted.wrapper
    got = measure(engine, model, loss_fn, torch.Generator().manual_seed(1), others=False)
    del engine
    assert (counted.grads, counted.optimizer, counted.bucket) == (got["grads"], got["optim"], got["bucket"]), \
        (counted, got)
    element = 2 if precision == "bf16" else 4
    assert 0 <= counted.params - got["params"] < 2 * 2 * (WORLD // tp) * element, (counted, got)


def test_engine_bytes_refuse_what_deepspeed_refuses(fake_world):
    # bf16 weights accumulating fp32 gradients without ZeRO: DeepSpeed raises NotImplementedError.
    with torch.device("meta"):
        model = Llama(SMALL)
    with pytest.raises(NotImplementedError):
        engine_bytes(model, rendered(0, "bf16", "config", WORLD), dp=WORLD)


# A real rank of a large job, counted on the meta device, next to the planner's estimate for it.

LARGE = [("llama3-8b", 8, 4), ("llama3-70b", 8, 16)]  # (preset, tp, dp)


@pytest.mark.parametrize("name,tp,dp", LARGE)
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_a_large_rank_is_counted_without_memory_and_agrees_with_the_planner(fake_world, name, tp, dp, zero):
    """A Llama 3 rank at tp 8 on the meta device: its parameters and optimizer state agree with the planner
    within 5% (ZeRO-3's whole small parameters and the padding are the difference), in fp32 also its
    gradients and bucket (at tp 8 no gradient outgrows the 5e8-element bucket). In bf16, accumulating in fp32
    as the config has it, DeepSpeed's gradients are not the planner's: under ZeRO-1 BF16_Optimizer keeps fp32
    gradients of every weight besides the bf16 ones (3x the planner's, and no bucket), under ZeRO-3 its
    gradient partition is fp32 (2x)."""
    cfg = preset(name)
    model, _ = sliced(cfg, tp, sequence_parallel=True)
    for precision in ("fp32", "bf16") if zero else ("fp32",):
        train = TrainConfig(global_batch_size=8 * dp, micro_batch_size=1, max_steps=10, warmup_steps=1)
        ds_config = deepspeed_config(train, ParallelConfig(tensor=tp, zero_stage=zero, sequence_parallel=True), 8,
                                     precision)
        counted = engine_bytes(model, ds_config, dp=dp)
        plan = estimate(ModelShape.of(cfg), Candidate(tp=tp, dp=dp, zero_stage=zero, sequence_parallel=True), 4096,
                        precision, global_batch=8 * dp)
        assert counted.params == pytest.approx(plan.params, rel=0.05), precision
        assert counted.optimizer == pytest.approx(plan.optimizer, rel=0.05), precision
        if precision == "fp32":
            assert counted.grads == pytest.approx(plan.grads, rel=0.05)
            assert counted.bucket == pytest.approx(plan.bucket, rel=0.05)


# Activations, measured: against the planner's per-block accounting (Korthikanti et al. 2022, as
# parallel/planner.py applies it to this model), with real tensors and under FakeTensorMode.

# (kv heads, MLP width, tp, sequence parallel) of a 256-wide, 4-head block: tests/test_planner.py's.
BLOCKS = [(2, 512, 1, False), (4, 512, 1, False), (2, 768, 1, False), (2, 512, 2, False), (2, 512, 2, True),
          (4, 768, 4, True), (2, 512, 4, True)]


def block_saved(cfg: ModelConfig, tp: int, sp: bool, s: int, b: int, fake: bool) -> tuple[int, int]:
    """(bytes a bf16 block of `cfg` saves for backward on rank 0 of tp at sequence s x micro-batch b, bytes still
    saved after its backward), with real tensors or fake ones."""
    model, _ = sliced(dataclasses.replace(cfg, num_layers=1), tp, sp)
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        materialized(model, torch.bfloat16)
        x = torch.zeros(b, s // (tp if sp else 1), cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        with SavedTensors(model) as saved:
            out = model.model.layers["0"](x, model.rope_cos[:s], model.rope_sin[:s])
        kept = saved.live
        out.backward(torch.ones_like(out))
    return kept, saved.live


@pytest.mark.parametrize("kv,ffn,tp,sp", BLOCKS)
def test_a_blocks_saved_activations_are_the_planners_with_real_or_fake_tensors(fake_world, kv, ffn, tp, sp):
    cfg = dataclasses.replace(preset("tiny"), hidden_size=256, num_heads=4, num_kv_heads=kv, ffn_hidden_size=ffn,
                              max_seq_len=256)
    real, fake = (block_saved(cfg, tp, sp, 256, 2, fake) for fake in (False, True))
    assert real == fake  # counting needs no memory
    planned = layer_activation_bytes(ModelShape.of(cfg), Candidate(tp=tp, micro_batch=2, sequence_parallel=sp), 256,
                                     attention_scores=False)[0]
    # What is left over is the attention's fp32 log-sum-exp and the like: under 2% here.
    assert real[0] == pytest.approx(planned, rel=0.02)
    assert real[1] == 0  # backward freed them


def test_two_micro_batches_in_flight_hold_twice_one_until_their_backward(fake_world):
    torch.manual_seed(0)
    model = Llama(preset("tiny"))
    tokens = [torch.randint(0, 512, (2, 65)) for _ in range(2)]
    with SavedTensors(model) as saved:
        first = model(tokens[0][:, :-1], tokens[0][:, 1:])
        one = saved.live
        second = model(tokens[1][:, :-1], tokens[1][:, 1:])
        two = saved.live
    assert one > 0 and two == 2 * one and saved.peak == two
    first.backward()
    assert saved.live == one
    second.backward()
    assert saved.live == 0 and saved.peak == two
    del second
    with SavedTensors(model) as saved:  # a graph dropped without backward frees its tensors too
        model(tokens[0][:, :-1], tokens[0][:, 1:])
    assert saved.live == 0 and saved.peak == one


@pytest.mark.parametrize("name", ["llama3-8b", "llama3-70b"])
def test_a_llama3_blocks_saved_activations_are_the_planners(fake_world, name):
    """A whole block of Llama 3 at tp 8 with sequence parallelism, seq 4096, in bf16: fake tensors, no memory."""
    cfg = preset(name)
    kept, left = block_saved(cfg, tp=8, sp=True, s=4096, b=1, fake=True)
    planned = layer_activation_bytes(ModelShape.of(cfg), Candidate(tp=8, sequence_parallel=True), 4096, False)[0]
    assert kept == pytest.approx(planned, rel=0.01)
    assert left == 0


def stage_of(model: Llama, first: bool, last: bool, loss_fn, targets: torch.Tensor, s: int):
    """A pipeline stage built from `model`'s blocks: the embedding on the first, the final norm, head and loss on
    the last; micro-batch input -> output (the loss on the last stage)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        if first:
            x = model.model.embed_tokens(x)
        for block in model.model.layers.values():
            x = block(x, model.rope_cos[:s], model.rope_sin[:s])
        if last:
            x = loss_fn(model.lm_head(model.model.norm(x)), targets)
        return x

    return forward


def test_the_first_and_last_pipeline_stages_of_llama3_70b_under_1f1b(fake_world):
    """Llama 3 70B on tp 8 x pp 16, seq 4096, 4 micro-batches per step: the first stage (embedding and 5
    blocks) keeps 4 micro-batches in flight, the last (5 blocks, norm, head and loss) one; the planner's
    blocks, head inputs and fp32 logits, measured within 1%. Fake tensors: seconds for a 70B-sized stage."""
    s, tp, pp, micro_batches = 4096, 8, 16, 4
    cfg = dataclasses.replace(preset("llama3-70b"), num_layers=5)  # one stage's blocks
    shape = ModelShape.of(preset("llama3-70b"))
    layout = Candidate(tp=tp, pp=pp, sequence_parallel=True)
    block = layer_activation_bytes(shape, layout, s, attention_scores=False)[0]
    model, loss_fn = sliced(cfg, tp, sequence_parallel=True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        materialized(model, torch.bfloat16)
        tokens = torch.randint(0, cfg.vocab_size, (1, s))
        first = stage_activations(stage_of(model, True, False, loss_fn, tokens, s), lambda i: tokens,
                                  in_flight=min(pp - 0, micro_batches), exclude=model)
        received = lambda i: torch.empty(1, s // tp, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        last = stage_activations(stage_of(model, False, True, loss_fn, tokens, s), received,
                                 in_flight=min(pp - (pp - 1), micro_batches), exclude=model)
    assert first.in_flight == 4 and first.per_micro_batch == [first.per_micro_batch[0]] * 4
    assert first.peak == pytest.approx(4 * 5 * block, rel=0.01)
    assert last.peak == pytest.approx(5 * block + sum(head_activation_bytes(shape, layout, s)), rel=0.01)
    assert first.left == last.left == 0
    assert first.outputs == 4 * s // tp * cfg.hidden_size * 2  # the activations sent on, one per micro-batch
