"""This process's part of a run, built from a validated config: the process group, the model with the
options it computes with, sliced for this rank by the layout, on its DeepSpeed engine."""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from foundry.data.stream import Dataset
from foundry.parallel.layout import Layout, recompute_every
from foundry.parallel.parallelize import parallelize
from foundry.parallel.tensor import LossFn, shard_of
from foundry.parallel.topology import Topology
from foundry.pretrain import engine as ds_engine
from foundry.pretrain import kernels
from foundry.pretrain.config import KernelConfig, ModelConfig, ParallelConfig, RunConfig
from foundry.pretrain.convert import hf_values
from foundry.pretrain.flops import device_peak_flops, flops_per_token
from foundry.pretrain.model import Llama, ModelOptions, initial_value, num_parameters
from foundry.pretrain.preflight import preflight

log = logging.getLogger("foundry")


@dataclasses.dataclass
class Run:
    """This process's part of a run: the model, sliced for this rank, on its DeepSpeed engine."""

    cfg: RunConfig  # for start(); the components are given the sections they use
    datasets: list[Dataset]
    topology: Topology
    grad_accum: int
    device: torch.device
    precision: str  # bf16 or fp32
    attention: str  # the attention path its activations take
    model: Llama | None  # the plain model whose (sliced) parameters the engine trains
    engine: Any
    loss_fn: Any  # of (logits, targets); None: the model computes its own loss (chunked output layer)
    plain_names: dict[int, str]  # id(parameter) -> its name in the plain model

    @property
    def layout(self) -> Layout:
        return self.topology.layout

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.run_dir)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch_size * self.cfg.data.seq_len

    @property
    def flops_per_token(self) -> float:
        return flops_per_token(self.cfg.model, self.cfg.data.seq_len)


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup_logging(rank: int, run_dir: Path) -> None:
    """Every rank logs everything to RUN_DIR/logs/rankN.log; on the console non-zero ranks stay quiet unless
    something goes wrong."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    console = logging.StreamHandler()
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S",
                        handlers=[console, logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")], force=True)
    # Known noise that says nothing about the run: DeepSpeed asks its own scheduler for the lr before
    # step 1, and ZeRO calls a collective that torch has renamed.
    logging.getLogger("DeepSpeed").addFilter(lambda r: "before it has started" not in r.getMessage())
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated")


def model_options(kernels_cfg: KernelConfig, parallel: ParallelConfig, layout: Layout,
                  document_end: int | None) -> ModelOptions:
    """How this run's model computes: [kernels], document masking (`document_end`: the token id that ends a
    document, None: no masking) and activation checkpointing."""
    return ModelOptions(
        attention=kernels_cfg.attention, rmsnorm=kernels_cfg.rmsnorm,
        # Under tensor or pipeline parallelism the vocab-parallel loss, or the last stage, owns the loss.
        loss_chunk=kernels_cfg.loss_chunk_tokens if layout.tp == layout.pp == 1 else 0,
        document_end=document_end,
        recompute_every=recompute_every(parallel.activation_checkpointing, parallel.activation_checkpointing_interval),
    )


def build_model(model_cfg: ModelConfig, parallel: ParallelConfig, options: ModelOptions, topology: Topology,
                device: torch.device, *, seed: int, seq_len: int,
                init_from: str | None) -> tuple[Llama, nn.Module, LossFn | None]:
    """This rank's part of the model: (the plain model, the module its engine trains, the loss function; None when
    the model computes its own loss). The model is built on the meta device and sliced for this rank while it
    has no memory (parallel/parallelize.py; pipeline stages balanced at `seq_len`); only then do this rank's
    parameters get memory and values: the initial values of `seed` (each parameter generated whole from the
    seed and its name, then cut: the same model under every layout) or those of the Hugging Face directory
    `init_from` (checkpoint.init_from), read slice by slice. No rank ever holds more than its own slices plus
    one full parameter."""
    with torch.device("meta"):
        model = Llama(model_cfg, options)
    if init_from:
        values = hf_values(Path(init_from), model_cfg)
        log.info("initial weights from %s", init_from)
    else:
        values = initial_values(model_cfg, seed, device)
    module, loss_fn = parallelize(model, topology, kernels.cross_entropy, parallel.sequence_parallel, seq_len,
                                  lambda keep: model.materialize(values, device, keep))
    recomputed = [int(i) for i, block in model.model.layers.items() if block.recompute]
    if recomputed:
        log.info("activation checkpointing (%s): blocks %s recompute in backward",
                 parallel.activation_checkpointing, recomputed)
    return model, module, None if options.loss_chunk else loss_fn


def initial_values(model_cfg: ModelConfig, seed: int, device: torch.device) -> Callable[[str, nn.Parameter], torch.Tensor]:
    """`Llama.materialize`'s values for a fresh model: each parameter's slice of its `initial_value`, generated
    whole on `device` (one parameter at a time) and cut."""

    def value(name: str, p: nn.Parameter) -> torch.Tensor:
        shard = shard_of(p)
        return shard.cut(initial_value(name, shard.full_shape, model_cfg, seed, device))

    return value


def start(cfg: RunConfig) -> Run:
    """Check the config, join the process group, and build the model, sliced for this rank, on its engine."""
    datasets, layout, grad_accum = preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    device = pick_device()
    ds_engine.init_distributed(device, cfg.train.collective_timeout_seconds)
    setup_logging(dist.get_rank(), Path(cfg.train.run_dir))
    topology = Topology(layout)
    precision = ds_engine.resolve_precision(cfg.train.precision, device)
    # Every dataset has the same tokenizer (preflight checks it).
    document_end = datasets[0].manifest["tokenizer"]["eos_id"] if cfg.data.document_mask else None
    options = model_options(cfg.kernels, cfg.parallel, layout, document_end)

    model, module, loss_fn = build_model(cfg.model, cfg.parallel, options, topology, device, seed=cfg.train.seed,
                                         seq_len=cfg.data.seq_len, init_from=cfg.checkpoint.init_from)
    plain_names = {id(p): n for n, p in model.named_parameters()}
    if cfg.kernels.compile:
        for block in model.model.layers.values():
            if not next(block.parameters()).is_meta:  # this rank's blocks
                block.compile()  # in place: parameter names, and so checkpoints, stay as they are

    # Tensors like this run's activations decide the kernel paths.
    probe = torch.empty(1, 1, 1, 1, device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    optimizer_path, optimizer_params = kernels.optimizer_params(cfg.kernels, device)
    log.info("kernels: attention %s | rmsnorm %s | loss %s | optimizer %s | torch.compile %s",
             kernels.explain_attention(probe, options.attention, options.document_end is not None),
             kernels.explain_rmsnorm(probe, options.rmsnorm),
             f"chunked, {options.loss_chunk} tokens" if options.loss_chunk else
             "vocab-parallel" if layout.tp > 1 else "whole logits", optimizer_path,
             "blocks" if cfg.kernels.compile else "off")
    ds_config = ds_engine.deepspeed_config(cfg.train, cfg.parallel, grad_accum, precision, optimizer_params)
    engine = ds_engine.initialize(module, ds_config, mpu=None if layout.pp > 1 else topology)

    t = cfg.train
    log.info(
        "layout: world %d = %s | ZeRO-%d | %s on %s | global batch %d = micro %d x accum %d x dp %d | seq %d",
        dist.get_world_size(), layout, cfg.parallel.zero_stage, precision, device.type, t.global_batch_size,
        t.micro_batch_size, grad_accum, layout.dp, cfg.data.seq_len,
    )
    peak = device_peak_flops(device)
    log.info(
        "model: %.2fM params (%.2fM non-embedding) | %.3g FLOP/token | peak %s",
        num_parameters(cfg.model) / 1e6, num_parameters(cfg.model, embedding=False) / 1e6,
        flops_per_token(cfg.model, cfg.data.seq_len),
        f"{peak / 1e12:.0f} TFLOP/s per device" if peak else "n/a (no bf16 peak known for this device): MFU n/a",
    )
    return Run(cfg, datasets, topology, grad_accum, device, precision, kernels.attention_path(probe, options.attention),
               model, engine, loss_fn, plain_names)


def finish(run: Run) -> None:
    """Leave the process group; every rank calls."""
    # Free the engine before tearing down gloo: a live engine at exit sometimes aborts the worker.
    run.engine = run.model = None
    dist.barrier(device_ids=[run.device.index] if run.device.type == "cuda" else None)
    dist.destroy_process_group()
