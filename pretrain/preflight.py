"""Every check of a run that needs no process group and no GPU: a bad run stops here, in seconds.

The trainer calls it first thing on every rank; `foundry launch` calls it before it starts torchrun or
submits a SLURM job, with the world size the job will have.
"""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path

from foundry.data.stream import Dataset, check_compatible, check_readers, manifest_path, open_dataset
from foundry.data.tokenizer import DataError
from foundry.parallel.layout import Layout
from foundry.pretrain import kernels
from foundry.pretrain.config import ConfigError, ModelConfig, RunConfig, check_world_size
from foundry.pretrain.convert import check_hf_weights, from_hf_config
from foundry.pretrain.evaluate import check_size


def preflight(cfg: RunConfig, world_size: int) -> tuple[list[Dataset], Layout, int]:
    """Every check that needs no process group: a bad run stops here, before any GPU time is spent.
    Returns the datasets, the layout and the gradient-accumulation steps."""
    check_paths(cfg)
    kernels.check(cfg.kernels)
    check_run_dir(Path(cfg.train.run_dir))
    datasets = [open_dataset(d.path, d.weight, d.urls) for d in cfg.data.datasets]
    check_compatible(datasets, cfg.data.streams)
    fingerprint = datasets[0].manifest["tokenizer"]["fingerprint"]
    for ds in validation_sets(cfg):
        if ds.manifest["tokenizer"]["fingerprint"] != fingerprint:
            raise DataError(f"validation set {ds.name} was tokenized with another tokenizer than {datasets[0].name}: "
                            f"prepare it with --tokenizer {datasets[0].tokenizer_file}")
        check_size(ds, cfg.data.seq_len, cfg.eval.tokens)
    vocab = datasets[0].manifest["tokenizer"]["vocab_size"]
    if cfg.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is below the tokenizer's {vocab} of "
                          f"{datasets[0].name}: set model.vocab_size >= {vocab}")
    if cfg.checkpoint.init_from:
        check_same_architecture(cfg.model, cfg.checkpoint.init_from)
        check_hf_weights(Path(cfg.checkpoint.init_from), cfg.model)
    layout = Layout.from_config(cfg.parallel, cfg.model, world_size)
    grad_accum = check_world_size(cfg.train, layout.dp)
    check_readers(cfg.data.streams, layout.dp, cfg.data.workers)
    return datasets, layout, grad_accum


def check_paths(cfg: RunConfig) -> None:
    """What the config names on disk is there: a mistyped path stops here with the key that names it. (Loading a
    config reads nothing but its YAML files, so that a config can be checked, and rendered, anywhere.)"""
    for i, dataset in enumerate(cfg.data.datasets):
        if not manifest_path(dataset.path).is_file():
            raise ConfigError(f"data.datasets[{i}].path={dataset.path} has no manifest.json: prepare it with "
                              f"`foundry prepare-data INPUT... --out {dataset.path}`")
    for i, path in enumerate(cfg.eval.datasets):
        if not manifest_path(path).is_file():
            raise ConfigError(f"eval.datasets[{i}]={path} has no manifest.json: prepare it with `foundry prepare-data "
                              f"INPUT... --holdout 0.01 --out DIR` (then DIR/holdout) or point at a prepared set")
    init_from = cfg.checkpoint.init_from
    if init_from is not None and not (Path(init_from) / "config.json").is_file():
        raise ConfigError(f"checkpoint.init_from={init_from} has no config.json: point it at a Hugging Face Llama "
                          f"directory")


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run directory any user may write into: they could plant a checkpoint or config that the run
    loads. (What the run creates gets the user's umask.)"""
    for d in (run_dir, run_dir / "checkpoints"):
        if d.is_dir() and d.stat().st_mode & stat.S_IWOTH:
            raise ConfigError(f"{d} is writable by every user (mode {stat.S_IMODE(d.stat().st_mode):o}): anyone could "
                              f"plant a checkpoint or config in it; run `chmod o-w {d}` or choose another train.run_dir")


def validation_sets(cfg: RunConfig) -> list[Dataset]:
    return [open_dataset(path) for path in cfg.eval.datasets]


def check_same_architecture(model: ModelConfig, hf_dir: str) -> None:
    """The run's [model] must be the imported model's architecture (init_std aside)."""
    theirs = from_hf_config(json.loads((Path(hf_dir) / "config.json").read_text()))
    for key in (f.name for f in dataclasses.fields(ModelConfig) if f.name != "init_std"):
        if getattr(theirs, key) != getattr(model, key):
            raise ConfigError(f"model.{key}={getattr(model, key)} but {hf_dir} has {getattr(theirs, key)}: use the "
                              f"model YAML that `foundry convert import {hf_dir} --out MODEL.yaml` writes")
