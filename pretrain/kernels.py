"""Kernel paths: which implementation runs attention, chosen per call from what is installed
and where the tensors live, and logged once per path so every run says what it used.

flash-attn (Dao-AILab) is optional: it is built against CUDA and cannot be installed on CPU
machines. Without it, or on CPU, or in fp32, attention runs through torch's
scaled_dot_product_attention, which picks its own fused backend.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:
    from flash_attn import flash_attn_func  # type: ignore[import-not-found]
except ImportError:
    flash_attn_func = None

_logged: set[str] = set()


def attention_path(q: torch.Tensor) -> str:
    """'flash-attn' or 'sdpa' for query tensors like `q`."""
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return "flash-attn"
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention. q (B, S, H, Dh), k and v (B, S, K, Dh) with K dividing H -> (B, S, H, Dh)."""
    path = attention_path(q)
    if path not in _logged:
        _logged.add(path)
        why = "" if path == "flash-attn" else (
            " (flash-attn not installed)" if flash_attn_func is None else " (flash-attn needs CUDA bf16/fp16 tensors)"
        )
        log.info("attention kernel: %s%s", path, why)
    if path == "flash-attn":
        return flash_attn_func(q, k, v, causal=True)  # native GQA when K divides H
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=q.shape[2] != k.shape[2]
    )  # (B, H, S, Dh)
    return out.transpose(1, 2)
