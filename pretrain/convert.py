"""Hugging Face Llama directories in and out: config.json + model.safetensors (sharded with an
index above 5 GB) + tokenizer.json when known. Our parameter names are Hugging Face's
LlamaForCausalLM names, so conversion is a format change, not a renaming; transformers, vLLM
and llama.cpp's converter read the result.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from foundry.parallel.tensor import shard_of
from foundry.pretrain.config import ConfigError, ModelConfig, RopeScalingConfig
from foundry.pretrain.model import Llama

SHARD_BYTES = 5 * 2**30


def to_hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.hidden_size // cfg.num_heads,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "torch_dtype": dtype,
    }
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        config["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                                  "high_freq_factor": s.high_freq_factor,
                                  "original_max_position_embeddings": s.original_max_seq_len}
    return config


def from_hf_config(config: dict) -> ModelConfig:
    if config.get("model_type") != "llama":
        raise ConfigError(f"model_type={config.get('model_type')!r} is not a Llama model: only Llama imports")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    scaling = None
    if rope.get("rope_type", rope.get("type")) == "llama3":
        scaling = RopeScalingConfig(factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                                    high_freq_factor=rope["high_freq_factor"],
                                    original_max_seq_len=rope["original_max_position_embeddings"])
    elif rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"RoPE scaling {rope.get('rope_type')!r} is not supported: only llama3 or none")
    return ModelConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"], num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        ffn_hidden_size=config["intermediate_size"], rope_theta=config.get("rope_theta", rope.get("rope_theta", 1e4)),
        rope_scaling=scaling, norm_eps=config["rms_norm_eps"], tie_embeddings=config.get("tie_word_embeddings", False),
        max_seq_len=config["max_position_embeddings"], init_std=config.get("initializer_range", 0.02),
    )


def save_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, out: Path, tokenizer: Path | None = None) -> None:
    """Write a Hugging Face Llama directory from a plain state dict of foundry.pretrain.model.Llama."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in state_dict.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(to_hf_config(cfg, dtype), indent=2))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer is not None and tokenizer.is_file():
        shutil.copy(tokenizer, out / "tokenizer.json")


def _weight_files(path: Path) -> dict[str, Path]:
    """Which safetensors file of a Hugging Face directory holds each tensor (empty for a single file: all)."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return {}
    return {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}


def hf_values(path: Path, cfg: ModelConfig) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """`Llama.materialize`'s values from a Hugging Face Llama directory: each parameter's slice (parallel/tensor.py's
    Shard) read alone with safetensors' `get_slice`, so a rank reads only what it holds, never the whole model.
    Each tensor opens its file afresh: the file's memory map (resident pages count as the process's memory)
    is released before the next."""
    files = _weight_files(path)

    def value(name: str, p: torch.Tensor) -> torch.Tensor:
        stored = "model.embed_tokens.weight" if cfg.tie_embeddings and name == "lm_head.weight" else name
        with safe_open(str(files.get(stored, path / "model.safetensors")), framework="pt") as f:
            return shard_of(p).read(f.get_slice(stored))

    return value


def check_hf_weights(path: Path, cfg: ModelConfig) -> None:
    """Every tensor a model of `cfg` needs is in the directory's safetensors files, with its shape (read from the
    files' headers only), so an incomplete download stops the run before it starts."""
    with torch.device("meta"):
        needed = {name: tuple(t.shape) for name, t in Llama(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        needed.pop("lm_head.weight")
    files = _weight_files(path)
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(files.values())) or [path / "model.safetensors"]:
        if not file.is_file():
            raise ConfigError(f"{path} is missing {file.name}: download the whole model directory")
        with safe_open(str(file), framework="pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    for name, shape in needed.items():
        if shapes.get(name) != shape:
            found = f"has shape {shapes[name]}" if name in shapes else "is missing"
            raise ConfigError(f"{path}: tensor {name} {found}, the model needs {shape}: point checkpoint.init_from "
                              f"at a whole Hugging Face Llama of this architecture")


def load_hf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config and plain state dict of a Hugging Face Llama directory."""
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} has no config.json: point at a Hugging Face model directory")
    cfg = from_hf_config(json.loads((path / "config.json").read_text()))
    state: dict[str, torch.Tensor] = {}
    for file in sorted(set(_weight_files(path).values())) or [path / "model.safetensors"]:
        if not file.is_file():
            raise ConfigError(f"{path} is missing {file.name}: download the whole model directory")
        state.update(load_file(str(file)))
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return cfg, state
