"""Hugging Face Llama directories in and out: config.json + model.safetensors (sharded with an
index above 5 GB) + tokenizer.json when known. Our parameter names are Hugging Face's
LlamaForCausalLM names, so conversion is a format change, not a renaming; transformers, vLLM
and llama.cpp's converter read the result.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from foundry.pretrain.config import ConfigError, ModelConfig, RopeScalingConfig

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


def load_hf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config and plain state dict of a Hugging Face Llama directory."""
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} has no config.json: point at a Hugging Face model directory")
    cfg = from_hf_config(json.loads((path / "config.json").read_text()))
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (path / name).is_file():
            raise ConfigError(f"{path} is missing {name}: download the whole model directory")
        state.update(load_file(str(path / name)))
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return cfg, state
