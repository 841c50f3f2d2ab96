"""The Llama transformer in plain PyTorch: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Read top to bottom in the order data flows. Submodule names follow Hugging Face's
LlamaForCausalLM (`model.layers.0.self_attn.q_proj`, ...) so checkpoints map one to one.
Nothing here knows about parallelism: `parallel/` transforms this model from outside.

How the model computes (kernel paths, chunked loss, document masking, recomputation) is fixed when it
is built (`ModelOptions`). Its values are given in one place, `Llama.materialize`: a model built on the meta
device (`with torch.device("meta"): m = Llama(cfg)`, no memory) can be sliced for a rank first and then
given only its slices' values. Each parameter's initial value depends on the seed and the parameter's name
alone (`initial_value`), so the model is the same whichever parameters a rank holds.

Shapes: B batch, S sequence, D hidden, H query heads, K kv heads, Dh head size, V vocab.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from foundry.pretrain.config import ModelConfig
from foundry.pretrain.kernels import Documents, attention, cross_entropy, head_cross_entropy, rms_norm


@dataclass(frozen=True)
class ModelOptions:
    """How the model computes, chosen when it is built. No option changes the parameters, so a checkpoint
    loads into a model whatever its options."""

    attention: str = "auto"  # kernels.attention: auto, flash-attn or sdpa (pretrain/kernels.py)
    rmsnorm: str = "auto"  # kernels.rmsnorm: auto, apex or torch
    # Tokens per chunk of the output layer + loss when targets are given (0: the whole logits at once).
    loss_chunk: int = 0
    # Document masking: the token id that ends a document (None: off). Tokens attend only within their
    # own document of the packed window, and RoPE positions restart at each document.
    document_end: int | None = None
    # Activation checkpointing: blocks 0, n, 2n, ... recompute their activations in backward instead of
    # storing them (1: every block; 0: none).
    recompute_every: int = 0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernel: str = "auto"):
        super().__init__()
        self.eps, self.kernel = eps, kernel
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.kernel)


def rope_frequencies(head_dim: int, cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (Dh/2,), with Llama-3 scaling of the long wavelengths when configured."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq.float()
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_freq_wavelen = s.original_max_seq_len / s.high_freq_factor
    # Long wavelengths are stretched by `factor`, short ones kept, the band between interpolated.
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    mid = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(mid, (1 - smooth) * inv_freq / s.factor + smooth * inv_freq, scaled).float()


def rope_cos_sin(inv_freq: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (S, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)  # (S, Dh): the half-split layout of HF Llama
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+Dh/2}) of x (B, S, heads, Dh) by position-dependent angles; cos and sin are
    (S, Dh), or (B, S, Dh) when each sequence has its own positions (document masking)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class KVCache:
    """Each attention layer's keys and values of the tokens seen so far, for generating one token at a time:
    a forward pass with a cache runs only the new tokens (all of the prompt first, then one per step)."""

    def __init__(self) -> None:
        self.length = 0  # tokens cached so far: the position of the next one
        self._kv: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def extend(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`layer`'s keys and values (B, S, K, Dh), cached ones first, with k and v appended."""
        if layer in self._kv:
            k, v = (torch.cat([old, new], dim=1) for old, new in zip(self._kv[layer], (k, v)))
        self._kv[layer] = (k, v)
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, kernel: str = "auto"):
        super().__init__()
        self.kernel = kernel
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                documents: Documents | None = None, cache: KVCache | None = None) -> torch.Tensor:
        # Shapes come from the projections' outputs, not from x, so a tensor-parallel shard of this
        # module (fewer heads; under sequence parallelism, x a slice of the sequence) runs unchanged.
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(*q.shape[:2], -1, self.head_dim)  # (B, S, H, Dh)
        k = k.view(*k.shape[:2], -1, self.head_dim)  # (B, S, K, Dh)
        v = v.view(*v.shape[:2], -1, self.head_dim)  # (B, S, K, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.extend(self, k, v)
        out = attention(q, k, v, documents, self.kernel)  # (B, S, H, Dh), causal (within each document)
        return self.o_proj(out.flatten(2))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """`recompute`: recompute this block's activations in backward instead of storing them."""

    def __init__(self, cfg: ModelConfig, options: ModelOptions = ModelOptions(), recompute: bool = False):
        super().__init__()
        self.recompute = recompute
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, options.rmsnorm)
        self.self_attn = Attention(cfg, options.attention)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, options.rmsnorm)
        self.mlp = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                documents: Documents | None = None, cache: KVCache | None = None) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, documents, use_reentrant=False)
        return self._forward(x, cos, sin, documents, cache)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 documents: Documents | None = None, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, documents, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    """Embedding, blocks and final norm: HF's `LlamaModel`, the `model.` prefix of its keys."""

    def __init__(self, cfg: ModelConfig, options: ModelOptions):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        every = options.recompute_every
        # A dict keyed "0".."n-1" keeps layer names stable when a pipeline stage holds only some.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, options, recompute=bool(every) and i % every == 0)
                                     for i in range(cfg.num_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, options.rmsnorm)


class Llama(nn.Module):
    """tokens (B, S) -> logits (B, S, V); with targets (B, S), the mean next-token loss instead. With a
    KVCache, `tokens` continue the cached sequence (see pretrain/generate.py)."""

    def __init__(self, cfg: ModelConfig, options: ModelOptions = ModelOptions(), seed: int | None = None):
        """On the meta device (the default device inside `with torch.device("meta")`) the model has shapes and no
        values; elsewhere it is materialised with the initial values of `seed` (None: a seed drawn from torch's
        default generator, so `torch.manual_seed` decides)."""
        super().__init__()
        self.cfg, self.options = cfg, options
        device = torch.get_default_device()
        with torch.device("meta"):
            self.model = LlamaBody(cfg, options)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            if cfg.tie_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight
            # Not persistent: derived from the config, so checkpoints stay free of them.
            self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, self.head_dim), persistent=False)
            self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, self.head_dim), persistent=False)
        if device.type != "meta":
            seed = int(torch.randint(2**62, ())) if seed is None else seed
            self.materialize(lambda name, p: initial_value(name, tuple(p.shape), cfg, seed, device), device)

    @property
    def head_dim(self) -> int:
        return self.cfg.hidden_size // self.cfg.num_heads

    @torch.no_grad()
    def materialize(self, value: Callable[[str, nn.Parameter], torch.Tensor], device: torch.device | str,
                    keep: Callable[[str], bool] = lambda name: True) -> None:
        """Memory and values on `device` for the parameters still on the meta device that `keep` names (the
        others stay shapes: a pipeline stage's rank keeps only its own layers), one at a time, and the RoPE
        tables. `value(name, p)` gives parameter `name`'s values, p's shape and dtype, p being the meta
        parameter (a tensor-parallel slice records which part of the full one it is: parallel/tensor.py's
        Shard). A parameter held under two names (tied embeddings) stays one; its attributes are kept."""
        names: dict[int, list[str]] = {}  # a parameter's names, the first its own (a tied head is the embedding)
        for name, p in self.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        made: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id -> (the meta one, kept alive: ids are reused; its own)
        for prefix, module in self.named_modules():
            for key, p in module._parameters.items():
                if p is None or not p.is_meta or not any(keep(name) for name in names[id(p)]):
                    continue
                if id(p) not in made:
                    own = nn.Parameter(value(names[id(p)][0], p).to(device=device, dtype=p.dtype),
                                       requires_grad=p.requires_grad)
                    for attr, flag in p.__dict__.items():  # tensor-parallel flags (a fake tensor's own stay)
                        own.__dict__.setdefault(attr, flag)
                    made[id(p)] = (p, own)
                module._parameters[key] = made[id(p)][1]
        if self.rope_cos.is_meta:
            self.rope_cos, self.rope_sin = (t.to(device) for t in
                                            rope_cos_sin(rope_frequencies(self.head_dim, self.cfg), self.cfg.max_seq_len))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        S = tokens.shape[1]
        start = cache.length if cache is not None else 0
        documents = None
        if self.options.document_end is None:
            cos, sin = self.rope_cos[start:start + S], self.rope_sin[start:start + S]
        else:
            ids, positions = document_positions(tokens, self.options.document_end)
            documents = Documents(ids)
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, S, Dh)
        x = self.model.embed_tokens(tokens)  # (B, S, D)
        for layer in self.model.layers.values():
            x = layer(x, cos, sin, documents, cache)
        if cache is not None:
            cache.length += S
        x = self.model.norm(x)
        if targets is None:
            return self.lm_head(x)  # (B, S, V)
        if self.options.loss_chunk:
            return head_cross_entropy(x, self.lm_head.weight, targets, self.options.loss_chunk)
        return cross_entropy(self.lm_head(x), targets)


def initial_value(name: str, shape: tuple[int, ...], cfg: ModelConfig, seed: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """The full initial value of parameter `name`: norm gains 1, weights Normal(0, init_std), the projections
    that write into the residual stream init_std / sqrt(2 * num_layers) so the residual variance stays bounded
    with depth (GPT-2). Drawn in fp32 from a generator seeded by the seed and the name alone, so every rank
    computes the same value for a parameter, whatever else it holds (on the same kind of device: CPU and CUDA
    generators draw different streams)."""
    if len(shape) == 1:
        return torch.ones(shape, device=device, dtype=torch.float32)
    std = cfg.init_std
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        std /= math.sqrt(2 * cfg.num_layers)
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    generator = torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.empty(shape, device=device, dtype=torch.float32).normal_(0.0, std, generator=generator)


def document_positions(tokens: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed windows (B, S): each token's document index within its window (a document's end token
    belongs to it) and its position within that document."""
    ends = (tokens == end).long()
    documents = ends.cumsum(dim=1) - ends  # (B, S): documents counted before this token
    index = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    # A document starts where the document index changes; each token's start is the latest such index.
    starts = torch.where(documents != documents.roll(1, dims=1), index, 0)
    starts[:, 0] = 0
    return documents, index - starts.cummax(dim=1).values


def num_parameters(cfg: ModelConfig, embedding: bool = True) -> int:
    """Parameter count from the config alone (no model built); tied weights counted once."""
    head_dim = cfg.hidden_size // cfg.num_heads
    attn = cfg.hidden_size * head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * cfg.hidden_size * cfg.ffn_hidden_size
    per_layer = attn + mlp + 2 * cfg.hidden_size
    total = cfg.num_layers * per_layer + cfg.hidden_size  # + final norm
    total += 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size  # output head
    return total + (cfg.vocab_size * cfg.hidden_size if embedding else 0)
