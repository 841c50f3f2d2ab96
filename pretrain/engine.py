"""The DeepSpeed engine: our config sections rendered into DeepSpeed's JSON config, then
`deepspeed.initialize`. DeepSpeed owns the optimizer, the LR schedule, ZeRO partitioning,
gradient accumulation, clipping and bf16 master weights."""

from __future__ import annotations

import datetime
import os
import sys
from typing import Any

import torch
from torch import nn

from foundry.pretrain.config import ParallelConfig, TrainConfig, check_precision


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def deepspeed_config(train: TrainConfig, parallel: ParallelConfig, grad_accum: int, precision: str,
                     optimizer: dict[str, Any] | None = None) -> dict[str, Any]:
    """`optimizer`: the AdamW implementation's settings (foundry.pretrain.kernels.optimizer_params); default torch's.
    Raises ConfigError for bf16 without ZeRO, which DeepSpeed can only run accumulating gradients in bf16."""
    check_precision(precision, parallel.zero_stage)
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": parallel.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        # Gradients accumulate across micro-batches in fp32, as in Megatron and torchtitan: a bf16 sum keeps 8
        # bits of mantissa, so every micro-batch added rounds away what the earlier ones summed to. bf16 under
        # ZeRO-1 (and pipelines) then runs on DeepSpeed's BF16_Optimizer (a whole fp32 gradient buffer), under
        # ZeRO-2/3 on the ZeRO optimizers with an fp32 gradient partition; without ZeRO it is refused above.
        # An fp32 model accumulates in fp32 anyway.
        "data_types": {"grad_accum_dtype": "fp32"},
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW unless asked otherwise: DeepSpeed's FusedAdam is a JIT-compiled CUDA/C++ op
            # (minutes cold, and absent on CPU); torch's is fused on CUDA and exact everywhere.
            "params": {"lr": train.lr, "betas": list(train.betas), "eps": train.eps,
                       "weight_decay": train.weight_decay, **(optimizer or {"torch_adam": True})},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": train.max_steps,
                "warmup_num_steps": max(train.warmup_steps, 1),
                "warmup_type": "linear",
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": train.min_lr_ratio,
            },
        },
        "steps_per_print": 2**31 - 1,  # our own logger reports; DeepSpeed's would duplicate it
        "wall_clock_breakdown": False,
    }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: decaying norm gains toward 0 just fights the normalisation."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def initialize(model: nn.Module, ds_config: dict[str, Any], mpu: Any = None) -> Any:
    """The engine for `model`; `mpu` gives the process groups (a PipelineModule brings its own)."""
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, ds_config["optimizer"]["params"]["weight_decay"]),
        config=ds_config, mpu=mpu,
    )
    return engine


def _import_deepspeed() -> None:
    """DeepSpeed's autotuner, which we never run, imports mlflow if it can: 2-3 s more start-up on every rank.
    Hide mlflow while DeepSpeed loads; rank 0's tracker imports it later for itself."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        return
    sys.modules["mlflow"] = None  # `import mlflow` fails at once
    try:
        import deepspeed  # noqa: F401
    finally:
        del sys.modules["mlflow"]


def init_distributed(device: torch.device, timeout_seconds: float = 1800.0) -> None:
    """Join the process group torchrun (or SLURM's srun) describes; a lone process is a world of one."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    _import_deepspeed()
    import deepspeed
    import deepspeed.ops

    if device.type == "cpu":
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory allreduce at every start (~50 s cold)
        # that only its inference path uses: mark it unavailable so gloo's allreduce is used.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Our own init binds NCCL to this rank's GPU (DeepSpeed's cannot), so collectives never guess the
    # device; DeepSpeed then adopts the existing group.
    timeout = datetime.timedelta(seconds=timeout_seconds)
    # Every group created later (DeepSpeed's data- and model-parallel groups, ours) takes torch's default
    # timeout, not the world group's: set the default, or a silent peer holds them for 30 minutes.
    c10d = torch.distributed.distributed_c10d
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    torch.distributed.init_process_group(backend, device_id=device if device.type == "cuda" else None,
                                         timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)


def free_port() -> int:
    """A TCP port free on this machine right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
