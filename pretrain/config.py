"""The run configuration: one typed tree, loaded from YAML files and `key=value` overrides.

Every key a user can set is a dataclass field below, and its `help` text is the reference
(`foundry train --help` prints it). Files compose left to right, then overrides win:

    foundry train configs/models/tiny.yaml configs/quickstart.yaml train.lr=1e-3

An unknown key, a value of the wrong type or an inconsistent combination is a `ConfigError`
with a one-line message that names the key and the fix, raised before anything is built.
"""

from __future__ import annotations

import copy
import dataclasses
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the key and the fix."""


def _help(default: Any, text: str) -> Any:
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})




@dataclass
class RopeScalingConfig:
    """Llama 3.1-style RoPE frequency scaling (long-context extension)."""

    factor: float = _help(8.0, "divide low frequencies by this factor")
    low_freq_factor: float = _help(1.0, "wavelengths above original_max_seq_len/low_freq_factor are scaled")
    high_freq_factor: float = _help(4.0, "wavelengths below original_max_seq_len/high_freq_factor are kept")
    original_max_seq_len: int = _help(8192, "context length of the unscaled pretraining run")


@dataclass
class ModelConfig:
    """Llama architecture. The presets in configs/models/ hold the published values."""

    vocab_size: int = _help(512, "embedding rows; must cover every token id of the tokenizer")
    hidden_size: int = _help(64, "model width d_model")
    num_layers: int = _help(4, "transformer blocks")
    num_heads: int = _help(4, "query heads; hidden_size must be divisible by it")
    num_kv_heads: int = _help(2, "key/value heads (grouped-query attention); divides num_heads")
    ffn_hidden_size: int = _help(192, "SwiGLU inner width")
    rope_theta: float = _help(10000.0, "RoPE base period")
    rope_scaling: Optional[RopeScalingConfig] = _help(None, "Llama-3 RoPE scaling; null for none")
    norm_eps: float = _help(1e-5, "RMSNorm epsilon")
    tie_embeddings: bool = _help(False, "share the input embedding with the output head")
    max_seq_len: int = _help(2048, "longest sequence the model is built for (RoPE table length)")
    init_std: float = _help(0.02, "std of the normal init; residual projections get init_std/sqrt(2*num_layers)")


@dataclass
class ParallelConfig:
    """How the work is split across processes: data-parallel size = world size / (tensor * pipeline)."""

    tensor: int = _help(1, "tensor-parallel size: each layer's weights split across this many neighbouring ranks")
    pipeline: int = _help(1, "pipeline-parallel size: the layers cut into this many consecutive stages")
    zero_stage: int = _help(1, "DeepSpeed ZeRO stage 0-3: what is partitioned across data-parallel ranks")
    sequence_parallel: bool = _help(False, "with tensor > 1, split norms and residuals along the sequence too")
    activation_checkpointing: str = _help("off", "recompute block activations in backward: off, full, selective")
    activation_checkpointing_interval: int = _help(2, "with selective: recompute every this-many-th block")


@dataclass
class KernelConfig:
    """Which implementation runs each hot spot; chosen at start-up and logged (pretrain/kernels.py)."""

    attention: str = _help("auto", "auto (flash-attn on CUDA bf16/fp16 when installed, else sdpa), flash-attn, sdpa")
    rmsnorm: str = _help("auto", "auto (NVIDIA apex's fused RMSNorm on CUDA when installed, else torch), apex, torch")
    optimizer: str = _help("auto", "AdamW: auto (torch fused on CUDA, torch foreach on CPU), torch-fused, torch, "
                                   "deepspeed-fused (DeepSpeed's JIT-compiled CUDA FusedAdam)")
    loss_chunk_tokens: int = _help(
        0, "compute the output layer and cross-entropy this many tokens at a time (recomputed in backward), so "
        "the fp32 logits of a large vocabulary are never held whole; 0: all at once. Without tensor/pipeline "
        "parallelism (the vocab-parallel loss already splits the vocabulary)"
    )
    compile: bool = _help(False, "torch.compile each transformer block (fuses RoPE, SwiGLU and norms; slow start)")


@dataclass
class DatasetConfig:
    """One dataset prepared by `foundry prepare-data`."""

    path: str = _help("???", "directory holding manifest.json (or the manifest file itself)")
    weight: float = _help(1.0, "share of training windows drawn from this dataset (weights are normalised)")
    urls: Optional[str] = _help(
        None, "where the shards are read from, if not next to the manifest: a brace pattern webdataset expands, "
        "e.g. 'pipe:curl -s http://host/shard-{000000..000099}.tar'"
    )


@dataclass
class DataConfig:
    """What the model reads: token shards streamed with webdataset (see data/stream.py)."""

    datasets: list[DatasetConfig] = _help([], "the datasets and their mixture weights")
    seq_len: int = _help(256, "tokens per training sequence")
    streams: int = _help(8, "independent shard readers; fixed for a run. Divides train.global_batch_size and is "
                            "divisible by data-parallel ranks x workers")
    workers: int = _help(1, "loader worker processes per rank (0: read in the training process)")
    shuffle: bool = _help(True, "seeded shard order per epoch and sample order within each shard")
    on_error: str = _help("stop", "a missing, truncated or corrupt shard: stop, or skip it (counted and logged)")
    document_mask: bool = _help(
        False, "tokens attend only within their own document of a packed window (documents end with the "
        "tokenizer's end-of-text token), with RoPE positions restarting at each document; not with pipeline stages"
    )


@dataclass
class EvalConfig:
    """Held-out validation (see pretrain/evaluate.py): the same tokens scored whatever the layout."""

    datasets: list[str] = _help(
        [], "validation sets, each a directory prepared like the training data (`foundry prepare-data --holdout` "
        "writes one to OUT/holdout) with the same tokenizer; reported under the directory's name"
    )
    interval: int = _help(0, "evaluate every this many steps and at the end (0: only at the end)")
    tokens: int = _help(16384, "tokens scored per set: its first ones, in windows of data.seq_len; a multiple of it")


@dataclass
class TrainConfig:
    """Optimisation. Batch sizes are in sequences; the layout never changes the maths."""

    seed: int = _help(1234, "seed for weights and data order")
    max_steps: int = _help(100, "optimizer steps to run")
    global_batch_size: int = _help(16, "sequences per optimizer step, summed over data-parallel ranks")
    micro_batch_size: int = _help(4, "sequences per forward pass on one rank; accumulation fills the rest")
    lr: float = _help(3e-4, "peak learning rate")
    min_lr_ratio: float = _help(0.1, "cosine decay ends at lr * min_lr_ratio")
    warmup_steps: int = _help(10, "linear warm-up steps from 0 to lr")
    weight_decay: float = _help(0.1, "AdamW decoupled weight decay on matrices (not on norms)")
    betas: list[float] = _help([0.9, 0.95], "AdamW betas")
    eps: float = _help(1e-8, "AdamW epsilon")
    grad_clip: float = _help(1.0, "clip the global gradient norm to this; 0 turns clipping off")
    precision: str = _help("auto", "auto (bf16 on GPU, fp32 on CPU), bf16 or fp32")
    run_dir: str = _help("runs/default", "where the resolved config, metrics and checkpoints go")
    step_timeout_seconds: float = _help(
        900.0, "hang watchdog: a rank that finishes no step for this long logs every rank's last step and its "
        "stacks and exits, so the job ends (0: off; the clock starts after the first step)"
    )
    collective_timeout_seconds: float = _help(1800.0, "a collective that waits this long on its peers fails")
    spike_factor: float = _help(
        4.0, "skip a step (no update) when a micro-batch loss exceeds this many times the mean loss of the last "
        "spike_window applied steps; 0: off. Steps with a loss or gradient norm that is not finite are always skipped"
    )
    spike_window: int = _help(50, "applied steps whose mean loss the spike check compares with; it starts once "
                                  "this many have run")
    max_skipped_in_row: int = _help(5, "after this many skipped steps in a row the run saves and stops with an error")


@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    interval: int = _help(0, "save every this many steps (0: only at the end)")
    resume: bool = _help(True, "continue from the newest complete checkpoint in run_dir when there is one")
    keep: int = _help(3, "how many of the newest complete checkpoints to keep")
    init_from: Optional[str] = _help(
        None, "initial weights: a Hugging Face Llama directory (config.json + safetensors) whose architecture "
        "matches [model] (`foundry convert import` writes that model YAML); any layout"
    )
    save_consolidated: bool = _help(
        False, "at the end, also gather the whole model into run_dir/model.pt, a plain fp32 state dict of "
        "foundry.pretrain.model.Llama (rank 0 holds it all in memory: small models only)"
    )
    continue_on_save_error: bool = _help(
        False, "when a save fails (disk full, no permission), log it and train on instead of stopping; the previous "
        "checkpoint stays the one a resume loads"
    )


@dataclass
class TrackingConfig:
    """What is reported and how often."""

    log_interval: int = _help(10, "log loss, lr, grad norm, tokens/s and MFU every this many steps")
    mlflow: bool = _help(True, "log the run to MLflow (rank 0, from a background thread; see pretrain/tracking.py)")
    uri: str = _help("", "MLflow tracking URI, e.g. http://mlflow.internal:5000 ('': SQLite in RUN_DIR/mlflow.db)")
    experiment: str = _help("foundry", "MLflow experiment the run belongs to")
    run_name: str = _help("", "MLflow run name ('': the run directory's name)")
    flush_seconds: float = _help(60.0, "at the end, wait this long for an unreachable MLflow before giving up")


@dataclass
class SlurmConfig:
    """The sbatch script `foundry launch slurm` writes: one task per node, each running torchrun."""

    partition: str = _help("", "partition to run in ('': the cluster's default)")
    account: str = _help("", "account to charge ('': your default)")
    time_minutes: int = _help(60, "time limit in minutes (2880: two days); near it the job saves and requeues itself")
    job_name: str = _help("", "job name ('': the run directory's name)")
    cpus_per_node: int = _help(0, "CPUs for the node's torchrun and its workers (0: SLURM's default)")
    gpus: bool = _help(True, "ask for launch.procs_per_node GPUs per node (false: a CPU-only job)")
    output: str = _help("", "log file, SLURM filename pattern ('': RUN_DIR/slurm-%j.out); attempts append to it")
    requeue: bool = _help(True, "on the time-limit warning, checkpoint and requeue the job; it resumes from there")
    sbatch_lines: list[str] = _help([], "extra sbatch options, one each, e.g. ['--qos=high', '--exclusive']")
    env: dict[str, str] = _help({}, "environment for the job, e.g. {NCCL_IB_HCA: mlx5, NCCL_DEBUG: WARN}")


@dataclass
class LaunchConfig:
    """Where the processes run: `foundry launch local` (torchrun) or `foundry launch slurm` (sbatch)."""

    nodes: int = _help(1, "machines; world size = nodes x procs_per_node")
    procs_per_node: int = _help(1, "training processes per machine: one per GPU (on CPU, any number)")
    rdzv_endpoint: str = _help("", "HOST:PORT on the first node, for torchrun across nodes outside SLURM; a "
                                   "relaunch N uses PORT + N")
    node_addr: str = _help("", "this node's address as the other nodes reach it ('': the address on "
                               "launch.interface, else the source address of the route to the rendezvous host); "
                               "several nodes: logged on each")
    interface: str = _help("", "network interface for gloo/NCCL (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME), the same "
                               "name on every node, e.g. ib0 ('': the one holding node_addr)")
    rdzv_port: int = _help(29500, "under SLURM: the rendezvous port on the allocation's first node, reached at "
                                  "its SLURM NodeAddr")
    max_restarts: int = _help(0, "local mode: relaunch a failed job this many times, resuming from its checkpoint")
    grace_seconds: int = _help(
        300, "a stop signal gives training this long to finish its step and save before it is killed; under "
        "SLURM the time-limit warning (SIGUSR1) comes this long before the limit"
    )
    slurm: SlurmConfig = _help(SlurmConfig(), "SLURM batch job")


@dataclass
class RunConfig:
    model: ModelConfig = _help(ModelConfig(), "the Llama model")
    parallel: ParallelConfig = _help(ParallelConfig(), "the process layout")
    kernels: KernelConfig = _help(KernelConfig(), "kernel paths")
    data: DataConfig = _help(DataConfig(), "the training data")
    eval: EvalConfig = _help(EvalConfig(), "held-out validation")
    train: TrainConfig = _help(TrainConfig(), "optimisation")
    checkpoint: CheckpointConfig = _help(CheckpointConfig(), "checkpoints")
    tracking: TrackingConfig = _help(TrackingConfig(), "logging")
    launch: LaunchConfig = _help(LaunchConfig(), "processes, nodes and SLURM")


def load_config(files: list[str], overrides: list[str]) -> RunConfig:
    """Merge YAML `files` (in order) and dotlist `overrides` onto the schema, then validate."""
    cfg = _merge(files, overrides)
    validate(cfg)
    return cfg


def load_model_config(path: str, overrides: list[str] = []) -> ModelConfig:
    """Just the model section of a preset, validated (for tools that need no run: planner, FLOPs)."""
    model = _merge([path], overrides).model
    validate_model(model)
    return model


def _merge(files: list[str], overrides: list[str]) -> RunConfig:
    try:
        merged = OmegaConf.structured(RunConfig)
        for path in files:
            if not Path(path).is_file():
                raise ConfigError(f"config file {path} not found: pass an existing YAML file (see configs/)")
            try:
                loaded = OmegaConf.load(path)
            except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:  # OSError: a scalar or list at the top
                raise ConfigError(f"config file {path} is not a YAML mapping of sections ({_first_line(e)}): "
                                  f"fix it there") from None
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"config file {path} is not a mapping of sections (model:, train:, ...): fix it")
            merged = OmegaConf.merge(merged, loaded)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value: write it as e.g. train.lr=3e-4")
            try:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
            except yaml.YAMLError as e:
                raise ConfigError(f"override {item!r}: YAML cannot read its value ({_first_line(e)}): quote it, "
                                  f"e.g. key='\"text\"'") from None
            except OmegaConfBaseException:
                raise
            except Exception as e:  # noqa: BLE001 - OmegaConf's key parser fails with bare errors on odd keys
                raise ConfigError(f"override {item!r} cannot be read ({type(e).__name__}): write it as "
                                  f"section.key=value, e.g. train.lr=3e-4") from None
        cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_message(e)) from None
    return cfg


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = repr(getattr(e, "full_key", None) or "?")[1:-1]  # user text, kept on one line
    first = _first_line(e)
    if type(e).__name__ in ("ConfigKeyError", "ConfigAttributeError") and "not in" in first:
        section = key.rsplit(".", 1)[0] if "." in key else ""
        return f"unknown config key '{key}': check its spelling; valid keys are listed by `foundry train --help`" + (
            f" under [{section}]" if section else ""
        )
    return f"bad value for config key '{key}': {first}"


def _require_positive(values: dict[str, float]) -> None:
    for key, value in values.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive: set it to a value > 0")


def validate_model(m: ModelConfig) -> None:
    _require_positive({
        "model.vocab_size": m.vocab_size, "model.hidden_size": m.hidden_size, "model.num_layers": m.num_layers,
        "model.num_heads": m.num_heads, "model.num_kv_heads": m.num_kv_heads,
        "model.ffn_hidden_size": m.ffn_hidden_size, "model.max_seq_len": m.max_seq_len,
    })
    if m.hidden_size % m.num_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}: "
            f"choose num_heads among {divisors(m.hidden_size)}"
        )
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}: "
            f"choose num_kv_heads among {divisors(m.num_heads)}"
        )
    if (m.hidden_size // m.num_heads) % 2:
        raise ConfigError(f"head size hidden_size/num_heads={m.hidden_size // m.num_heads} is odd: RoPE needs it even")


def validate(cfg: RunConfig) -> None:
    """Check what a single field's type cannot: ranges and relations between keys."""
    m, t, d = cfg.model, cfg.train, cfg.data
    validate_model(m)
    _require_positive({
        "data.seq_len": d.seq_len, "data.streams": d.streams, "train.max_steps": t.max_steps, "train.global_batch_size": t.global_batch_size,
        "train.micro_batch_size": t.micro_batch_size, "train.lr": t.lr, "tracking.log_interval": cfg.tracking.log_interval,
        "train.spike_window": t.spike_window, "train.max_skipped_in_row": t.max_skipped_in_row,
    })
    if t.spike_factor and t.spike_factor <= 1:
        raise ConfigError(f"train.spike_factor={t.spike_factor} would skip ordinary steps: use a factor > 1 "
                          f"(e.g. 4), or 0 to turn the spike check off")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}: lower seq_len or raise max_seq_len")
    if t.warmup_steps < 0 or t.weight_decay < 0 or t.grad_clip < 0 or cfg.checkpoint.interval < 0:
        raise ConfigError("train.warmup_steps, train.weight_decay, train.grad_clip and checkpoint.interval must be >= 0")
    if cfg.checkpoint.init_from is not None and not (Path(cfg.checkpoint.init_from) / "config.json").is_file():
        raise ConfigError(f"checkpoint.init_from={cfg.checkpoint.init_from} has no config.json: point it at a "
                          f"Hugging Face Llama directory")
    if cfg.checkpoint.keep < 1:
        raise ConfigError(f"checkpoint.keep={cfg.checkpoint.keep} must be >= 1: the newest checkpoint is always kept")
    if t.step_timeout_seconds < 0 or t.collective_timeout_seconds <= 0:
        raise ConfigError("train.step_timeout_seconds must be >= 0 (0: off) and train.collective_timeout_seconds > 0")
    if t.warmup_steps >= t.max_steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} is not below train.max_steps={t.max_steps}: "
                          f"lower warmup_steps (e.g. {max(t.max_steps // 10, 0)})")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio={t.min_lr_ratio} must lie in [0, 1]: e.g. 0.1")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise ConfigError(f"train.betas={t.betas} must be two numbers in [0, 1): e.g. [0.9, 0.95]")
    if t.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"train.precision={t.precision!r} is not one of auto, bf16, fp32")
    if cfg.parallel.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={cfg.parallel.zero_stage} is not a ZeRO stage: use 0, 1, 2 or 3")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size="
            f"{t.micro_batch_size}: make it one (e.g. {t.micro_batch_size * max(1, t.global_batch_size // t.micro_batch_size)})"
        )
    if d.workers < 0 or d.on_error not in ("stop", "skip"):
        raise ConfigError(f"data.workers={d.workers} must be >= 0 and data.on_error={d.on_error!r} stop or skip")
    if t.global_batch_size % d.streams:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of data.streams="
                          f"{d.streams}: each step takes the same number of windows from every stream")
    k = cfg.kernels
    for key, value, allowed in (("attention", k.attention, ("auto", "flash-attn", "sdpa")),
                                ("rmsnorm", k.rmsnorm, ("auto", "apex", "torch")),
                                ("optimizer", k.optimizer, ("auto", "torch-fused", "torch", "deepspeed-fused"))):
        if value not in allowed:
            raise ConfigError(f"kernels.{key}={value!r} is not one of {', '.join(allowed)}")
    if k.loss_chunk_tokens < 0:
        raise ConfigError(f"kernels.loss_chunk_tokens={k.loss_chunk_tokens} must be >= 0 (0: no chunking)")
    if d.document_mask and cfg.parallel.pipeline > 1:
        raise ConfigError("data.document_mask=true is not supported with parallel.pipeline > 1 yet (the stages pass "
                          "only hidden states): turn one of them off")
    la = cfg.launch
    _require_positive({"launch.nodes": la.nodes, "launch.procs_per_node": la.procs_per_node,
                       "launch.grace_seconds": la.grace_seconds,
                       "launch.slurm.time_minutes": la.slurm.time_minutes})
    if la.max_restarts < 0 or la.max_restarts and not cfg.checkpoint.resume:
        raise ConfigError(f"launch.max_restarts={la.max_restarts} needs to be >= 0, and relaunching needs "
                          f"checkpoint.resume=true (or a relaunch starts over)")
    e = cfg.eval
    if e.interval < 0 or e.tokens <= 0 or e.tokens % d.seq_len:
        raise ConfigError(f"eval.interval={e.interval} must be >= 0 and eval.tokens={e.tokens} a positive multiple "
                          f"of data.seq_len={d.seq_len}: e.g. eval.tokens={max(e.tokens // d.seq_len, 1) * d.seq_len}")
    for i, path in enumerate(e.datasets):
        manifest = Path(path) / "manifest.json" if Path(path).is_dir() else Path(path)
        if not manifest.is_file():
            raise ConfigError(f"eval.datasets[{i}]={path} has no manifest.json: prepare it with `foundry prepare-data "
                              f"INPUT... --holdout 0.01 --out DIR` (then DIR/holdout) or point at a prepared set")
    if not d.datasets:
        raise ConfigError("data.datasets is empty: name at least one prepared dataset, e.g. "
                          "data.datasets='[{path: runs/data/stdlib}]' (see `foundry prepare-data --help`)")
    for i, ds in enumerate(d.datasets):
        manifest = Path(ds.path) / "manifest.json" if Path(ds.path).is_dir() else Path(ds.path)
        if not manifest.is_file():
            raise ConfigError(f"data.datasets[{i}].path={ds.path} has no manifest.json: prepare it with "
                              f"`foundry prepare-data INPUT... --out {ds.path}`")
        if ds.weight <= 0:
            raise ConfigError(f"data.datasets[{i}].weight={ds.weight} must be positive")


def check_world_size(train: TrainConfig, world_size: int) -> int:
    """Return the gradient-accumulation steps that make the global batch on `world_size` ranks."""
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by micro_batch_size x data-parallel "
            f"ranks = {train.micro_batch_size} x {world_size}: use a multiple of {per_step} or change micro_batch_size"
        )
    return train.global_batch_size // per_step


def divisors(n: int) -> list[int]:
    """Positive divisors of n, ascending: the valid choices offered in error messages."""
    return [k for k in range(1, n + 1) if n % k == 0]


def to_yaml(cfg: RunConfig) -> str:
    """The config as written anywhere (run dir, logs, checkpoints): passwords redacted (see `public`)."""
    return OmegaConf.to_yaml(OmegaConf.structured(public(cfg)))


REDACTED = "***"


def redact_uri(uri: str | None) -> str | None:
    """`uri` with the password in it, if any, replaced by ***."""
    if not uri:
        return uri
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:{REDACTED}@{host}"))


def public(cfg: RunConfig) -> RunConfig:
    """A copy of `cfg` that is safe to write down: the tracking URI's password redacted. (The password reaches
    the processes that need it through the environment: foundry.pretrain.tracking.credentials_to_env.)"""
    return dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri=redact_uri(cfg.tracking.uri)))


def reference(section: Any = RunConfig, prefix: str = "") -> list[str]:
    """One line per key, `key (default): help`, generated from the schema."""
    lines = []
    for f in dataclasses.fields(section):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            lines.append(f"[{key}] {f.metadata.get('help', '')}")
            lines += reference(type(default), key + ".")
        else:
            lines.append(f"  {key} = {default!r}: {f.metadata.get('help', '')}")
    return lines
