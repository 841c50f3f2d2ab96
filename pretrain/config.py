"""The run configuration: one typed tree, loaded from YAML files and `key=value` overrides.

Every key a user can set is a dataclass field below, and its `help` text is the reference
(`foundry train --help` prints it). Files compose left to right, then overrides win:

    foundry train configs/models/tiny.yaml configs/quickstart.yaml train.lr=1e-3

A key with a fixed set of values is a `Literal`, which omegaconf checks as it merges; a key's range
(`must_be`) and the rules between a section's keys are checked by the section (`Section.validate`);
only what relates two sections is checked by `validate`. An unknown key (with the nearest known one),
a value of the wrong type or shape, or an inconsistent combination is a `ConfigError` with a one-line
message naming the key and the fix, raised before anything is built. Loading reads nothing but the
YAML files: whether the paths a config names exist is checked by foundry.pretrain.preflight.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException, ValidationError

from foundry.parallel.layout import divisors


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the key and the fix."""


POSITIVE, NOT_NEGATIVE = "positive", ">= 0"  # a key's range (`must_be`); where 0 is allowed, its help says why
_RANGES = {POSITIVE: lambda v: v > 0, NOT_NEGATIVE: lambda v: v >= 0}  # `not v > 0` also refuses NaN


def _help(default: Any, text: str, *, must_be: str | None = None, example: str | None = None) -> Any:
    """A key: its default, its meaning, its range, and for a list or mapping an example of one."""
    metadata = {"help": f"{text}, e.g. {example}" if example else text, "must_be": must_be, "example": example}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class Section:
    """A config section. `validate` checks each key's range, then the section's own `rules`."""

    def validate(self, key: str) -> None:
        """`key`: where the section sits in the run config (e.g. "train"), for the messages."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key}.{f.name}={value} is not a finite number: set a number")
            rule = f.metadata.get("must_be")
            if rule and not _RANGES[rule](value):
                raise ConfigError(f"{key}.{f.name}={value} must be {rule}: e.g. {key}.{f.name}={f.default}")
        self.rules(key)

    def rules(self, key: str) -> None:
        """What a single key's type and range cannot say: the relations between this section's keys."""


@dataclass
class RopeScalingConfig(Section):
    """Llama 3.1-style RoPE frequency scaling (long-context extension)."""

    factor: float = _help(8.0, "divide low frequencies by this factor", must_be=POSITIVE)
    low_freq_factor: float = _help(1.0, "wavelengths above original_max_seq_len/low_freq_factor are scaled",
                                   must_be=POSITIVE)
    high_freq_factor: float = _help(4.0, "wavelengths below original_max_seq_len/high_freq_factor are kept")
    original_max_seq_len: int = _help(8192, "context length of the unscaled pretraining run", must_be=POSITIVE)

    def rules(self, key: str) -> None:
        if self.high_freq_factor <= self.low_freq_factor:  # the band between them is divided by their difference
            raise ConfigError(f"{key}.high_freq_factor={self.high_freq_factor} must exceed {key}.low_freq_factor="
                              f"{self.low_freq_factor}: Llama 3.1 uses 4.0 and 1.0")


@dataclass
class ModelConfig(Section):
    """Llama architecture. The presets in configs/models/ hold the published values."""

    vocab_size: int = _help(512, "embedding rows; must cover every token id of the tokenizer", must_be=POSITIVE)
    hidden_size: int = _help(64, "model width d_model", must_be=POSITIVE)
    num_layers: int = _help(4, "transformer blocks", must_be=POSITIVE)
    num_heads: int = _help(4, "query heads; hidden_size must be divisible by it", must_be=POSITIVE)
    num_kv_heads: int = _help(2, "key/value heads (grouped-query attention); divides num_heads", must_be=POSITIVE)
    ffn_hidden_size: int = _help(192, "SwiGLU inner width", must_be=POSITIVE)
    rope_theta: float = _help(10000.0, "RoPE base period", must_be=POSITIVE)
    rope_scaling: Optional[RopeScalingConfig] = _help(None, "Llama-3 RoPE scaling; null for none")
    norm_eps: float = _help(1e-5, "RMSNorm epsilon", must_be=POSITIVE)
    tie_embeddings: bool = _help(False, "share the input embedding with the output head")
    max_seq_len: int = _help(2048, "longest sequence the model is built for (RoPE table length)", must_be=POSITIVE)
    init_std: float = _help(0.02, "std of the normal init; residual projections get init_std/sqrt(2*num_layers)",
                            must_be=NOT_NEGATIVE)

    def rules(self, key: str) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"{key}.hidden_size={self.hidden_size} is not divisible by {key}.num_heads={self.num_heads}: "
                f"choose num_heads among {divisors(self.hidden_size)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{key}.num_heads={self.num_heads} is not divisible by {key}.num_kv_heads={self.num_kv_heads}: "
                f"choose num_kv_heads among {divisors(self.num_heads)}"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(f"head size {key}.hidden_size/num_heads={self.hidden_size // self.num_heads} is odd: "
                              f"RoPE needs it even")
        if self.rope_scaling is not None:
            self.rope_scaling.validate(f"{key}.rope_scaling")


@dataclass
class ParallelConfig(Section):
    """How the work is split across processes: data-parallel size = world size / (tensor * pipeline)."""

    tensor: int = _help(1, "tensor-parallel size: each layer's weights split across this many neighbouring ranks",
                        must_be=POSITIVE)
    pipeline: int = _help(1, "pipeline-parallel size: the layers cut into this many consecutive stages",
                          must_be=POSITIVE)
    zero_stage: Literal[0, 1, 2, 3] = _help(1, "DeepSpeed ZeRO stage: what is partitioned across data-parallel ranks")
    sequence_parallel: bool = _help(False, "with tensor > 1, split norms and residuals along the sequence too")
    activation_checkpointing: Literal["off", "full", "selective"] = _help(
        "off", "recompute block activations in backward: none, every block, or every interval-th block"
    )
    activation_checkpointing_interval: int = _help(2, "with selective: recompute every this-many-th block",
                                                   must_be=POSITIVE)


@dataclass
class KernelConfig(Section):
    """Which implementation runs each hot spot; chosen at start-up and logged (pretrain/kernels.py)."""

    attention: Literal["auto", "flash-attn", "sdpa"] = _help(
        "auto", "auto: flash-attn on CUDA bf16/fp16 when installed, else sdpa"
    )
    rmsnorm: Literal["auto", "apex", "torch"] = _help(
        "auto", "auto: NVIDIA apex's fused RMSNorm on CUDA when installed, else torch"
    )
    optimizer: Literal["auto", "torch-fused", "torch", "deepspeed-fused"] = _help(
        "auto", "AdamW. auto: torch fused on CUDA, torch foreach on CPU; deepspeed-fused: DeepSpeed's JIT-compiled "
        "CUDA FusedAdam"
    )
    loss_chunk_tokens: int = _help(
        0, "compute the output layer and cross-entropy this many tokens at a time (recomputed in backward), so "
        "the fp32 logits of a large vocabulary are never held whole; 0: all at once. Without tensor/pipeline "
        "parallelism (the vocab-parallel loss already splits the vocabulary)", must_be=NOT_NEGATIVE
    )
    compile: bool = _help(False, "torch.compile each transformer block (fuses RoPE, SwiGLU and norms; slow start)")


@dataclass
class DatasetConfig(Section):
    """One dataset prepared by `foundry prepare-data`."""

    path: str = _help("???", "directory holding manifest.json (or the manifest file itself)")
    weight: float = _help(1.0, "share of training windows drawn from this dataset (weights are normalised)",
                          must_be=POSITIVE)
    urls: Optional[str] = _help(
        None, "where the shards are read from, if not next to the manifest: a brace pattern webdataset expands, "
        "e.g. 'pipe:curl -s http://host/shard-{000000..000099}.tar'"
    )


@dataclass
class DataConfig(Section):
    """What the model reads: token shards streamed with webdataset (see data/stream.py)."""

    datasets: list[DatasetConfig] = _help([], "the datasets and their mixture weights",
                                          example="[{path: runs/data/stdlib, weight: 1.0}]")
    seq_len: int = _help(256, "tokens per training sequence", must_be=POSITIVE)
    streams: int = _help(8, "independent shard readers; fixed for a run. Divides train.global_batch_size and is "
                            "divisible by data-parallel ranks x workers", must_be=POSITIVE)
    workers: int = _help(1, "loader worker processes per rank (0: read in the training process)", must_be=NOT_NEGATIVE)
    shuffle: bool = _help(True, "seeded shard order per epoch and sample order within each shard")
    on_error: Literal["stop", "skip"] = _help(
        "stop", "a missing, truncated or corrupt shard: stop, or skip it (counted and logged)"
    )
    document_mask: bool = _help(
        False, "tokens attend only within their own document of a packed window (documents end with the "
        "tokenizer's end-of-text token), with RoPE positions restarting at each document; not with pipeline stages"
    )

    def rules(self, key: str) -> None:
        if not self.datasets:
            raise ConfigError(f"{key}.datasets is empty: name at least one prepared dataset, e.g. "
                              f"{key}.datasets='[{{path: runs/data/stdlib}}]' (see `foundry prepare-data --help`)")
        for i, dataset in enumerate(self.datasets):
            dataset.validate(f"{key}.datasets[{i}]")


@dataclass
class EvalConfig(Section):
    """Held-out validation (see pretrain/evaluate.py): the same tokens scored whatever the layout."""

    datasets: list[str] = _help(
        [], "validation sets, each a directory prepared like the training data (`foundry prepare-data --holdout` "
        "writes one to OUT/holdout) with the same tokenizer; reported under the directory's name",
        example="[runs/data/stdlib/holdout]"
    )
    interval: int = _help(0, "evaluate every this many steps and at the end (0: only at the end)", must_be=NOT_NEGATIVE)
    tokens: int = _help(16384, "tokens scored per set: its first ones, in windows of data.seq_len; a multiple of it",
                        must_be=POSITIVE)
    timeout_seconds: float = _help(1800.0, "hang watchdog: an evaluation that runs this long on a rank ends the job "
                                           "as a hung step does (0: no limit)", must_be=NOT_NEGATIVE)


@dataclass
class TrainConfig(Section):
    """Optimisation. Batch sizes are in sequences; the layout never changes the maths."""

    seed: int = _help(1234, "seed for weights and data order")
    max_steps: int = _help(100, "optimizer steps to run", must_be=POSITIVE)
    global_batch_size: int = _help(16, "sequences per optimizer step, summed over data-parallel ranks",
                                   must_be=POSITIVE)
    micro_batch_size: int = _help(4, "sequences per forward pass on one rank; accumulation fills the rest",
                                  must_be=POSITIVE)
    lr: float = _help(3e-4, "peak learning rate", must_be=POSITIVE)
    min_lr_ratio: float = _help(0.1, "cosine decay ends at lr * min_lr_ratio, in [0, 1]")
    warmup_steps: int = _help(10, "linear warm-up steps from 0 to lr; fewer than max_steps", must_be=NOT_NEGATIVE)
    weight_decay: float = _help(0.1, "AdamW decoupled weight decay on matrices (not on norms)", must_be=NOT_NEGATIVE)
    betas: list[float] = _help([0.9, 0.95], "AdamW betas, two numbers in [0, 1)", example="[0.9, 0.95]")
    eps: float = _help(1e-8, "AdamW epsilon", must_be=POSITIVE)
    grad_clip: float = _help(1.0, "clip the global gradient norm to this; 0 turns clipping off", must_be=NOT_NEGATIVE)
    precision: Literal["auto", "bf16", "fp32"] = _help("auto", "auto: bf16 on GPU, fp32 on CPU")
    run_dir: str = _help("runs/default", "where the resolved config, metrics and checkpoints go")
    step_timeout_seconds: float = _help(
        900.0, "hang watchdog: a rank that finishes no training step for this long logs every rank's last step and "
        "its stacks and exits, so the job ends; one step only: saves and evaluations have their own limits "
        "(checkpoint.timeout_seconds, eval.timeout_seconds). 0: the watchdog is off, for those too; the clock starts "
        "after the first step", must_be=NOT_NEGATIVE
    )
    collective_timeout_seconds: float = _help(1800.0, "a collective that waits this long on its peers fails",
                                              must_be=POSITIVE)
    spike_factor: float = _help(
        4.0, "skip a step (no update) when a micro-batch loss exceeds this many times the mean loss of the last "
        "spike_window applied steps; 0: off. Steps with a loss or gradient norm that is not finite are always skipped",
        must_be=NOT_NEGATIVE
    )
    spike_window: int = _help(50, "applied steps whose mean loss the spike check compares with; it starts once "
                                  "this many have run", must_be=POSITIVE)
    max_skipped_in_row: int = _help(5, "after this many skipped steps in a row the run saves and stops with an error",
                                    must_be=POSITIVE)

    def rules(self, key: str) -> None:
        if self.warmup_steps >= self.max_steps:
            raise ConfigError(f"{key}.warmup_steps={self.warmup_steps} is not below {key}.max_steps={self.max_steps}: "
                              f"lower warmup_steps (e.g. {self.max_steps // 10})")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{key}.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]: e.g. 0.1")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{key}.betas={self.betas} must be two numbers in [0, 1): e.g. [0.9, 0.95]")
        if self.spike_factor and self.spike_factor <= 1:
            raise ConfigError(f"{key}.spike_factor={self.spike_factor} would skip ordinary steps: use a factor > 1 "
                              f"(e.g. 4), or 0 to turn the spike check off")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"{key}.global_batch_size={self.global_batch_size} is not a multiple of {key}.micro_batch_size="
                f"{self.micro_batch_size}: make it one (e.g. "
                f"{self.micro_batch_size * max(1, self.global_batch_size // self.micro_batch_size)})"
            )


@dataclass
class CheckpointConfig(Section):
    """Saving and resuming."""

    interval: int = _help(0, "save every this many steps (0: only at the end)", must_be=NOT_NEGATIVE)
    resume: bool = _help(True, "continue from the newest complete checkpoint in run_dir when there is one")
    keep: int = _help(3, "how many of the newest complete checkpoints to keep (the newest always is)",
                      must_be=POSITIVE)
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
    timeout_seconds: float = _help(
        3600.0, "hang watchdog: a rank that waits this long on a save (its copy to host memory, or its background "
        "write when the next save or the end of the run waits for it) ends the job as a hung step does; the previous "
        "checkpoint stays the one a resume loads (0: no limit)", must_be=NOT_NEGATIVE
    )


@dataclass
class TrackingConfig(Section):
    """What is reported and how often."""

    log_interval: int = _help(10, "log loss, lr, grad norm, tokens/s and MFU every this many steps", must_be=POSITIVE)
    mlflow: bool = _help(True, "log the run to MLflow (rank 0, from a background thread; see pretrain/tracking.py)")
    uri: str = _help("", "MLflow tracking URI, e.g. http://mlflow.internal:5000 ('': SQLite in RUN_DIR/mlflow.db)")
    experiment: str = _help("foundry", "MLflow experiment the run belongs to")
    run_name: str = _help("", "MLflow run name ('': the run directory's name)")
    flush_seconds: float = _help(60.0, "at the end, wait this long for an unreachable MLflow before giving up",
                                 must_be=NOT_NEGATIVE)


@dataclass
class SlurmConfig(Section):
    """The sbatch script `foundry launch slurm` writes: one task per node, each running torchrun."""

    partition: str = _help("", "partition to run in ('': the cluster's default)")
    account: str = _help("", "account to charge ('': your default)")
    time_minutes: int = _help(60, "time limit in minutes (2880: two days); near it the job saves and requeues itself",
                              must_be=POSITIVE)
    job_name: str = _help("", "job name ('': the run directory's name)")
    cpus_per_node: int = _help(0, "CPUs for the node's torchrun and its workers (0: SLURM's default)",
                               must_be=NOT_NEGATIVE)
    gpus: bool = _help(True, "ask for launch.procs_per_node GPUs per node (false: a CPU-only job)")
    output: str = _help("", "log file, SLURM filename pattern ('': RUN_DIR/slurm-%j.out); attempts append to it")
    requeue: bool = _help(True, "on the time-limit warning, checkpoint and requeue the job; it resumes from there")
    sbatch_lines: list[str] = _help([], "extra sbatch options, one each", example="['--qos=high', '--exclusive']")
    env: dict[str, str] = _help({}, "environment for the job", example="{NCCL_IB_HCA: mlx5, NCCL_DEBUG: WARN}")


@dataclass
class LaunchConfig(Section):
    """Where the processes run: `foundry launch local` (torchrun) or `foundry launch slurm` (sbatch)."""

    nodes: int = _help(1, "machines; world size = nodes x procs_per_node", must_be=POSITIVE)
    procs_per_node: int = _help(1, "training processes per machine: one per GPU (on CPU, any number)",
                                must_be=POSITIVE)
    rdzv_endpoint: str = _help("", "HOST:PORT on the first node, for torchrun across nodes outside SLURM; a "
                                   "relaunch N uses PORT + N")
    node_addr: str = _help("", "this node's address as the other nodes reach it ('': the address on "
                               "launch.interface, else the source address of the route to the rendezvous host); "
                               "several nodes: logged on each")
    interface: str = _help("", "network interface for gloo/NCCL (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME), the same "
                               "name on every node, e.g. ib0 ('': the one holding node_addr)")
    rdzv_port: int = _help(29500, "under SLURM: the rendezvous port on the allocation's first node, reached at "
                                  "its SLURM NodeAddr", must_be=POSITIVE)
    max_restarts: int = _help(0, "local mode: relaunch a failed job this many times, resuming from its checkpoint",
                              must_be=NOT_NEGATIVE)
    grace_seconds: int = _help(
        300, "a stop signal gives training this long to finish its step and save before it is killed; under "
        "SLURM the time-limit warning (SIGUSR1) comes this long before the limit", must_be=POSITIVE
    )
    slurm: SlurmConfig = _help(SlurmConfig(), "SLURM batch job")

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def rules(self, key: str) -> None:
        self.slurm.validate(f"{key}.slurm")


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


def validate(cfg: RunConfig) -> None:
    """Each section checks itself; then what relates two sections."""
    for f in dataclasses.fields(cfg):
        getattr(cfg, f.name).validate(f.name)
    m, d, t = cfg.model, cfg.data, cfg.train
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}: lower seq_len or "
                          f"raise max_seq_len")
    if t.global_batch_size % d.streams:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of data.streams="
                          f"{d.streams}: each step takes the same number of windows from every stream")
    if cfg.eval.tokens % d.seq_len:
        raise ConfigError(f"eval.tokens={cfg.eval.tokens} is not a multiple of data.seq_len={d.seq_len}: e.g. "
                          f"eval.tokens={max(cfg.eval.tokens // d.seq_len, 1) * d.seq_len}")
    if d.document_mask and cfg.parallel.pipeline > 1:
        raise ConfigError("data.document_mask=true is not supported with parallel.pipeline > 1 yet (the stages pass "
                          "only hidden states): turn one of them off")
    if cfg.launch.max_restarts and not cfg.checkpoint.resume:
        raise ConfigError(f"launch.max_restarts={cfg.launch.max_restarts} needs checkpoint.resume=true (or a "
                          f"relaunch starts over)")
    check_precision(t.precision, cfg.parallel.zero_stage)


def check_precision(precision: str, zero_stage: int) -> None:
    """bf16 trains under ZeRO >= 1 only: DeepSpeed sums gradients over micro-batches in fp32 only there
    (pretrain/engine.py). Checked on the config (train.precision=bf16) and again on the precision "auto" resolves
    to on the device."""
    if precision == "bf16" and zero_stage == 0:
        raise ConfigError("parallel.zero_stage=0 with bf16: DeepSpeed without ZeRO sums gradients over micro-batches "
                          "in bf16, losing precision; use parallel.zero_stage=1 (or 2, 3), which sums them in fp32")


def load_config(files: list[str], overrides: list[str]) -> RunConfig:
    """Merge YAML `files` (in order) and dotlist `overrides` onto the schema, then validate."""
    cfg = _merge(files, overrides)
    validate(cfg)
    return cfg


def load_model_config(path: str) -> ModelConfig:
    """Just the model section of a preset, validated (for tools that need no run: planner, FLOPs)."""
    model = _merge([path], []).model
    model.validate("model")
    return model


def _merge(files: list[str], overrides: list[str]) -> RunConfig:
    try:
        pieces = [*map(_read, files), *map(_parse, overrides)]
        cfg: RunConfig = OmegaConf.to_object(OmegaConf.merge(_schema(), *pieces))  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_message(e)) from None
    return cfg


@functools.cache
def _schema() -> DictConfig:
    """The typed tree of defaults, built once: merging copies it (and building it is most of a load's time)."""
    return OmegaConf.structured(RunConfig)


def _read(path: str) -> DictConfig:
    if not Path(path).is_file():
        raise ConfigError(f"config file {path} not found: pass an existing YAML file (see configs/)")
    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:  # OSError: a scalar or list at the top
        raise ConfigError(f"config file {path} is not a YAML mapping of sections ({first_line(e)}): "
                          f"fix it there") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} is not a mapping of sections (model:, train:, ...): fix it")
    return _checked(loaded)


def _parse(item: str) -> DictConfig:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value: write it as e.g. train.lr=3e-4")
    try:
        override = OmegaConf.from_dotlist([item])
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: YAML cannot read its value ({first_line(e)}): quote it, "
                          f"e.g. key='\"text\"'") from None
    except OmegaConfBaseException:
        raise
    except Exception as e:  # noqa: BLE001 - OmegaConf's key parser fails with bare errors on odd keys
        raise ConfigError(f"override {item!r} cannot be read ({type(e).__name__}): write it as "
                          f"section.key=value, e.g. train.lr=3e-4") from None
    return _checked(override)


def first_line(e: BaseException) -> str:
    """An exception's message cut to one line, for the one-line errors the user sees."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# What the user wrote is checked against the schema's shape before omegaconf merges it: omegaconf reports an
# unknown key, or a value where a list belongs, without the key's full name (or with a bare TypeError).


def _checked(piece: DictConfig) -> DictConfig:
    """`piece` (one YAML file or override), once every key in it is known and every value has the right shape."""
    _check_shape(OmegaConf.to_container(piece, resolve=False), RunConfig, "", None)
    return piece


def _check_shape(value: Any, kind: Any, key: str, example: str | None) -> None:
    """Refuse an unknown key (naming the nearest known one), a value where a section, list or mapping belongs,
    and a list or mapping where one value belongs. Scalar types and enumerations are omegaconf's to check.
    `example`: how the list or mapping that `key` is in (or is) is written, e.g. "train.betas='[0.9, 0.95]'"."""
    kind, optional = _without_optional(kind)
    if (value is None and optional) or (isinstance(value, str) and "${" in value):  # interpolations resolve later
        return
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(_not_a_section(key, kind, example))
        keys = _hints(kind)
        for name, item in value.items():
            if name not in keys:
                raise ConfigError(_unknown_key(key, name, keys))
            written = {f.name: f.metadata.get("example") for f in dataclasses.fields(kind)}[name]
            _check_shape(item, keys[name], _join(key, name), f"{_join(key, name)}={_quoted(written)}" if written
                         else example)
    elif origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={_show(value)} is not a list: write it as one, e.g. {example}")
        for i, item in enumerate(value):
            _check_shape(item, args[0], f"{key}[{i}]", example)
    elif origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={_show(value)} is not a mapping: write it as one, e.g. {example}")
        for name, item in value.items():
            _check_shape(item, args[1], _join(key, name), example)
    elif isinstance(value, (list, dict)):
        shape = "a list" if isinstance(value, list) else "a mapping"
        raise ConfigError(f"{key} takes one value, not {shape}: e.g. {example or f'{key}={_show(_default(key))}'}")


def _not_a_section(key: str, kind: Any, example: str | None) -> str:
    names = [f.name for f in dataclasses.fields(kind)]
    if example:  # an entry of a list of sections
        return f"{key} is not a mapping of {', '.join(names)}: write the list as e.g. {example}"
    if not key:
        return "the config is not a mapping of sections (model:, train:, ...)"
    return (f"{key} is a section, not a value: set its keys ({', '.join(names)}), e.g. "
            f"{key}.{names[0]}={_show(getattr(kind(), names[0]))}")


def _unknown_key(section: str, name: Any, known: dict[str, Any]) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1)
    hint = (f"did you mean '{_join(section, close[0])}'?" if close else
            f"the keys{' of [' + section + ']' if section else ''} are {', '.join(known)}")
    return f"unknown config key '{_join(section, _show(name))}': {hint}"


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    """What omegaconf refused (after the shape check: a scalar of the wrong type, a value outside a Literal,
    a missing or unresolvable value), as one line naming the key."""
    key = _key_of(e)
    value = getattr(e, "value", None)
    kind = _schema_type(key)
    if isinstance(e, ValidationError) and typing.get_origin(kind) is Literal:
        allowed = typing.get_args(kind)
        message = f"{key}={_show(value)} is not one of {', '.join(map(str, allowed))}"
        meant = [v for v in allowed if isinstance(value, bool) and v in _YAML_BOOLEANS[value]]
        if meant:  # YAML 1.1, which omegaconf reads, turns a bare off into false
            message += f": YAML reads a bare {meant[0]} as {str(value).lower()}, quote it: {key}=\"'{meant[0]}'\""
        return message
    if isinstance(e, ValidationError) and kind is not None:
        example = _default(key) if "[" not in key else None
        return (f"{key}={_show(value)} is not {_a(kind)}" +
                (f": e.g. {key}={_show(example)}" if example not in (None, "") else ""))
    if isinstance(e, MissingMandatoryValue):
        return f"{key} has no value: set it"
    return f"bad value for config key '{key}': {first_line(e)}"


_YAML_BOOLEANS = {True: ("y", "yes", "on", "true"), False: ("n", "no", "off", "false")}


def _key_of(e: OmegaConfBaseException) -> str:
    """The key omegaconf names, with its section: within a list of sections omegaconf names the key alone."""
    key = repr(str(getattr(e, "full_key", None) or "?"))[1:-1]  # user text, kept on one line
    owner = getattr(e, "object_type", None)
    if _schema_type(key) is None and dataclasses.is_dataclass(owner):
        return next((_join(place, key) for place, kind in _places() if kind is owner), key)
    return key


def _places(kind: Any = RunConfig, key: str = "") -> list[tuple[str, Any]]:
    """Every section of the schema and where it sits, e.g. ("data.datasets[i]", DatasetConfig)."""
    found = [(key, kind)]
    for name, hint in _hints(kind).items():
        hint, _ = _without_optional(hint)
        if typing.get_origin(hint) is list:
            hint, name = typing.get_args(hint)[0], f"{name}[i]"
        if dataclasses.is_dataclass(hint):
            found += _places(hint, _join(key, name))
    return found


def _schema_type(key: str) -> Any:
    """The annotated type of `key` (e.g. "train.lr", "data.datasets[0].weight"), or None if there is no such key."""
    kind: Any = RunConfig
    for part in key.replace("[", ".[").split("."):
        kind, _ = _without_optional(kind)
        if part.startswith("["):
            if typing.get_origin(kind) is not list:
                return None
            kind = typing.get_args(kind)[0]
        elif dataclasses.is_dataclass(kind) and part in _hints(kind):
            kind = _hints(kind)[part]
        elif typing.get_origin(kind) is dict:
            kind = typing.get_args(kind)[1]
        else:
            return None
    return _without_optional(kind)[0]


def _default(key: str) -> Any:
    """The default of a key outside lists, e.g. 3e-4 for "train.lr"."""
    value: Any = RunConfig()
    for part in key.split("."):
        value = getattr(value, part, None)
    return value


@functools.cache
def _hints(kind: Any) -> dict[str, Any]:
    return typing.get_type_hints(kind)


def _without_optional(kind: Any) -> tuple[Any, bool]:
    args = typing.get_args(kind)
    if typing.get_origin(kind) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return kind, False


def _join(section: str, name: Any) -> str:
    return f"{section}.{name}" if section else str(name)


def _show(value: Any) -> str:
    """A value as the user wrote it, on one line."""
    return repr(value)[1:-1] if isinstance(value, str) else repr(value)


def _quoted(text: str) -> str:
    """`text` quoted for the shell."""
    return f'"{text}"' if "'" in text else f"'{text}'"


def _a(kind: Any) -> str:
    name = getattr(kind, "__name__", str(kind))
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def check_world_size(train: TrainConfig, world_size: int) -> int:
    """Return the gradient-accumulation steps that make the global batch on `world_size` ranks."""
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by micro_batch_size x data-parallel "
            f"ranks = {train.micro_batch_size} x {world_size}: use a multiple of {per_step} or change micro_batch_size"
        )
    return train.global_batch_size // per_step


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
    """One line per key, `key = default (allowed values or range): help`, generated from the schema."""
    lines = []
    for f in dataclasses.fields(section):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            lines.append(f"[{key}] {f.metadata.get('help', '')}")
            lines += reference(type(default), key + ".")
            continue
        kind = _hints(section)[f.name]
        allowed = " | ".join(map(str, typing.get_args(kind))) if typing.get_origin(kind) is Literal \
            else f.metadata["must_be"]
        lines.append(f"  {key} = {default!r}{f' ({allowed})' if allowed else ''}: {f.metadata.get('help', '')}")
    return lines
