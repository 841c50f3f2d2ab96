"""One rank of a large job, run in this process before any cluster time is spent (`foundry simulate`).

torch's fake process-group backend lets this process be rank R of a world of any size: collectives
return at once and move nothing, so values are meaningless, but every tensor has the shape and size
the real rank's has, and the code that runs is the trainer's own (pretrain/build.py). What the rank
holds is then measured, or, when it could not fit in this machine's memory, counted without
allocating it (torch's fake tensors: shapes and sizes, no storage), and set next to what
`foundry plan` (parallel/planner.py) predicts for that rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Iterator
from unittest import mock

import torch
import torch.distributed as dist

from foundry.parallel.layout import Layout
from foundry.parallel.planner import Candidate, Memory, ModelShape, stage_memory
from foundry.parallel.stages import stage_blocks
from foundry.parallel.topology import Topology
from foundry.pretrain.config import ConfigError, RunConfig, check_world_size

GIB = 2**30
CATEGORIES = ("params", "grads", "optimizer", "activations", "buffers")
STEPS = 2  # optimizer steps a measured rank runs: the first creates the optimizer state


@contextlib.contextmanager
def fake_world(rank: int, world_size: int) -> Iterator[None]:
    """This process as `rank` of `world_size` on the fake backend, for torch and for DeepSpeed, until the end
    of the block (the environment is restored and the group destroyed after)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    env = {"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29500", "DS_ACCELERATOR": "cpu"}
    before = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import real_accelerator
    from deepspeed.utils import groups

    accelerator, shm = real_accelerator.ds_accelerator, deepspeed.ops.__compatible_ops__.get("deepspeed_shm_comm")
    try:
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as pretrain/engine.py does on CPU
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)  # adopts the fake group
        yield
    finally:
        # DeepSpeed keeps the groups (and the mpu) of the last engine, and the accelerator it chose, in module
        # globals: forget ours with the world.
        for name in ("mpu", "_WORLD_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP",
                     "_DATA_PARALLEL_GROUP", "_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE", "_MPU_TENSOR_MODEL_PARALLEL_RANK"):
            setattr(groups, name, None)
        real_accelerator.ds_accelerator = accelerator
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = shm
        if dist.is_initialized():
            dist.destroy_process_group()
        for key, value in before.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


def coordinates(topology: Topology) -> dict[str, int]:
    """This rank's place in the layout: its tp, pp and dp rank."""
    return {"tp": topology.get_tensor_model_parallel_rank(), "pp": topology.get_pipeline_model_parallel_rank(),
            "dp": topology.get_data_parallel_rank()}


@dataclasses.dataclass
class RankReport:
    """What one simulated rank holds, by category (CATEGORIES), next to the planner's estimate for its stage."""

    rank: int
    world: int
    layout: str
    coordinates: dict[str, int]
    blocks: range  # the transformer blocks of its pipeline stage
    parameters: int  # its parameters: tensor-parallel slices of its stage's
    mode: str  # "measured" (real tensors, the engine built and stepped) or "counted" (fake tensors)
    how: dict[str, str]  # per category: how it was known
    got: dict[str, float]
    planned: dict[str, float]
    optimizer: str  # the optimizer DeepSpeed wraps AdamW in
    steps: int  # optimizer steps run


def available_bytes() -> int:
    """Memory this machine can still give (MemAvailable)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def planned_memory(cfg: RunConfig, layout: Layout, precision: str, stage: int) -> Memory:
    """The planner's estimate for pipeline `stage` of the run `cfg` on `layout`."""
    candidate = Candidate(layout.tp, layout.pp, layout.dp, zero_stage=cfg.parallel.zero_stage,
                          micro_batch=cfg.train.micro_batch_size, checkpointing=cfg.parallel.activation_checkpointing,
                          checkpoint_interval=cfg.parallel.activation_checkpointing_interval,
                          sequence_parallel=cfg.parallel.sequence_parallel)
    return stage_memory(ModelShape.of(cfg.model), candidate, cfg.data.seq_len, precision, cfg.train.global_batch_size,
                        stage)


def _planned(memory: Memory) -> dict[str, float]:
    return {"params": memory.params, "grads": memory.grads, "optimizer": memory.optimizer,
            "activations": memory.activations, "buffers": memory.buffers}


@contextlib.contextmanager
def _fake_tensors(dtype: torch.dtype) -> Iterator[None]:
    """Tensors with shapes and no storage (FakeTensorMode), made in `dtype` by default. DeepSpeed's PipelineModule
    moves itself to the device it already is on (CPU); torch cannot move fake parameters (it swaps them, which
    the fake mode's weak references forbid), so that move is skipped."""
    from deepspeed.pipe import PipelineModule
    from torch._subclasses.fake_tensor import FakeTensorMode

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), mock.patch.object(PipelineModule, "to", lambda self, *a, **k: self):
            yield
    finally:
        torch.set_default_dtype(default)


def simulate(cfg: RunConfig, rank: int, measure_if_fits: bool = True) -> RankReport:
    """Run what `rank` of the configured world (launch.nodes x launch.procs_per_node GPUs) does up to its first
    optimizer steps, in this process on the fake process group, and report what it holds. A rank whose planned
    state fits in half of this machine's available memory is built with real tensors, its DeepSpeed engine set
    up and, without pipelining, stepped (state measured by `census`); any other is built with fake tensors and
    its engine's state counted by DeepSpeed's rules (pretrain/memory.py's `engine_bytes`, held to real engines by
    tests/test_memory.py). Activations are measured either way: the stage's forwards and backwards run as 1F1B
    runs them at its fullest, counting what autograd saves. Precision "auto" is taken as bf16, a GPU's."""
    from foundry.pretrain.build import build_model, model_options
    from foundry.pretrain.engine import deepspeed_config
    from foundry.pretrain.memory import engine_bytes

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its memory reports would bury ours
    world = cfg.launch.world_size
    if not 0 <= rank < world:
        raise ConfigError(f"--rank {rank} is outside the world of {world} ranks (launch.nodes x launch.procs_per_node): "
                          f"pass 0-{world - 1}")
    layout = Layout.from_config(cfg.parallel, cfg.model, world)
    grad_accum = check_world_size(cfg.train, layout.dp)
    precision = "bf16" if cfg.train.precision == "auto" else cfg.train.precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    ds_config = deepspeed_config(cfg.train, cfg.parallel, grad_accum, precision)
    with fake_world(rank, world):
        topology = Topology(layout)
        stage = topology.get_pipeline_model_parallel_rank()
        planned = planned_memory(cfg, layout, precision, stage)
        measured = measure_if_fits and planned.total - planned.overhead < available_bytes() / 2
        options = model_options(cfg.kernels, cfg.parallel, layout, document_end=None)
        blocks = stage_blocks(ModelShape.of(cfg.model), layout.pp, cfg.data.seq_len)[stage]
        with contextlib.nullcontext() if measured else _fake_tensors(dtype):
            # Initial values, whatever checkpoint.init_from says: the weights' values change no byte counted.
            model, module, loss_fn = build_model(cfg.model, cfg.parallel, options, topology, torch.device("cpu"),
                                                 seed=cfg.train.seed, seq_len=cfg.data.seq_len, init_from=None)
            if measured:
                module.to(dtype)
            counted = engine_bytes(module, ds_config, layout.dp, topology.get_data_parallel_rank(),
                                   pipeline=layout.pp > 1)
            activations = _activations(cfg, model, module, loss_fn, layout, stage, grad_accum, blocks)
            module.zero_grad(set_to_none=True)  # the engine below starts from no gradients
        got = {"params": counted.params, "grads": counted.grads, "optimizer": counted.optimizer,
               "activations": activations, "buffers": counted.bucket}
        how = {key: "counted (DeepSpeed's rules)" for key in CATEGORIES}
        how["activations"] = "measured" if measured else "measured on fake tensors"
        steps = 0
        if measured:
            got_state, optimizer, steps = _engine_state(cfg, model, module, loss_fn, topology, ds_config, grad_accum)
            got.update(got_state)
            how.update({key: "measured" for key in got_state})
        else:
            optimizer = counted.wrapper
        parameters = sum(p.numel() for p in module.parameters())
        return RankReport(rank, world, str(layout), coordinates(topology), blocks, parameters,
                          "measured" if measured else "counted", how, got, _planned(planned), optimizer, steps)


def _activations(cfg: RunConfig, model: Any, module: Any, loss_fn: Any, layout: Layout, stage: int, grad_accum: int,
                 blocks: range) -> int:
    """The most activation bytes the stage holds in a step: its forwards and backwards as 1F1B runs them at its
    fullest (min(pp - stage, micro-batches) in flight), plus, where blocks recompute in backward, one block's
    stored activations rebuilt then (torch's checkpoint keeps those out of sight of saved-tensor hooks)."""
    from foundry.pretrain.memory import SavedTensors, stage_activations

    b, s, h = cfg.train.micro_batch_size, cfg.data.seq_len, cfg.model.hidden_size
    local_s = s // (layout.tp if cfg.parallel.sequence_parallel else 1)
    dtype = next(module.parameters()).dtype
    first, last = stage == 0, stage == layout.pp - 1
    targets = torch.zeros(b, s, dtype=torch.long)

    def make_input(_: int) -> torch.Tensor:
        if first:
            return torch.zeros(b, s, dtype=torch.long)
        return torch.zeros(b, local_s, h, dtype=dtype, requires_grad=True)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if layout.pp > 1:
            out = module(x)
            return module.loss_fn(out, targets) if last else out
        return module(x, targets) if loss_fn is None else loss_fn(module(x), targets)

    run = stage_activations(forward, make_input, min(layout.pp - stage, grad_accum), exclude=module)
    recomputed = [i for i in blocks if model.model.layers[str(i)].recompute]
    if not recomputed:
        return run.peak
    block = model.model.layers[str(recomputed[0])]
    block.recompute = False
    try:
        # The model's RoPE tables are not the stage's (cast with it): neither is an activation.
        with SavedTensors(exclude=[*module.parameters(), *module.buffers(), model.rope_cos, model.rope_sin]) as saved:
            x = torch.zeros(b, local_s, h, dtype=dtype, requires_grad=True)
            out = block(x, model.rope_cos[:s], model.rope_sin[:s])
            rebuilt = saved.live
        out.backward(torch.ones_like(out))
    finally:
        block.recompute = True
    return run.peak + rebuilt


def _engine_state(cfg: RunConfig, model: Any, module: Any, loss_fn: Any, topology: Topology, ds_config: dict,
                  grad_accum: int) -> tuple[dict[str, float], str, int]:
    """A real DeepSpeed engine's bytes on this rank (pretrain/memory.py's `census`): params and optimizer after
    its steps, grads and bucket at their most, probed after each backward. Without pipelining the engine runs
    STEPS optimizer steps on random tokens; a pipeline stage's engine is only set up (its schedule exchanges
    activation shapes with its neighbours, which the fake group cannot carry), and its gradient and
    optimizer bytes are left to the rules."""
    from foundry.pretrain.engine import initialize
    from foundry.pretrain.memory import census

    layout = topology.layout
    engine = initialize(module, ds_config, mpu=None if layout.pp > 1 else topology)
    optimizer = type(engine.optimizer).__name__
    if layout.pp > 1:
        return {"params": census(engine, module)["params"]}, optimizer, 0
    b, s = cfg.train.micro_batch_size, cfg.data.seq_len
    probes = []
    generator = torch.Generator().manual_seed(0)
    for _ in range(STEPS * grad_accum):
        tokens = torch.randint(0, cfg.model.vocab_size, (b, s + 1), generator=generator)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        loss = engine(inputs, targets) if loss_fn is None else loss_fn(engine(inputs), targets)
        engine.backward(loss)
        probes.append(census(engine, model))
        engine.step()
    after = census(engine, model)
    got = {"params": after["params"], "optimizer": after["optim"],
           "grads": max(p["grads"] for p in probes), "buffers": max(p["bucket"] for p in probes)}
    return got, optimizer, STEPS


def format_report(r: RankReport) -> str:
    """The rank's table: measured or counted bytes next to the planner's, and their ratio."""
    blocks = f"blocks {r.blocks.start}-{r.blocks[-1]}" if len(r.blocks) else "no blocks"
    lines = [
        f"rank {r.rank} of {r.world}: tp {r.coordinates['tp']}, pp {r.coordinates['pp']}, dp {r.coordinates['dp']} "
        f"of {r.layout} | {blocks} | {r.parameters:,} parameters | {r.optimizer} | {r.mode}"
        + (f", {r.steps} optimizer steps run" if r.steps else ""),
        f"  {'':<12}{'simulated':>11}{'planned':>11}{'ratio':>8}  how",
    ]
    for key in CATEGORIES:
        got, planned = r.got[key], r.planned[key]
        ratio = f"{got / planned:.3f}" if planned else ("=" if not got else "n/a")
        lines.append(f"  {key:<12}{_size(got):>11}{_size(planned):>11}{ratio:>8}  {r.how[key]}")
    total, planned = sum(r.got.values()), sum(r.planned.values())
    lines.append(f"  {'total':<12}{_size(total):>11}{_size(planned):>11}{total / planned:>8.3f}")
    return "\n".join(lines)


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def default_ranks(cfg: RunConfig) -> list[int]:
    """The first rank of the first, a middle and the last pipeline stage."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology  # the rank order topology.py uses

    layout = Layout.from_config(cfg.parallel, cfg.model, cfg.launch.world_size)
    order = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
    return [order.filter_match(pipe=stage, data=0, model=0)[0] for stage in sorted({0, layout.pp // 2, layout.pp - 1})]
