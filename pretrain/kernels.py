"""Kernel paths: which implementation runs attention, RMSNorm and the loss, chosen from the config
(`[kernels]`, handed to the model when it is built) and what is installed; the `kernels:` line that
pretrain/build.py logs at start-up says which paths a run takes and why.

flash-attn (Dao-AILab) and NVIDIA apex are optional: both build against CUDA and cannot be
installed on CPU machines. Without flash-attn, or on CPU, or in fp32, attention runs through
torch's scaled_dot_product_attention, which picks its own fused backend (flash / memory-efficient
on GPU). Without apex, RMSNorm runs through torch's `F.rms_norm`. A path asked for by name that
is not installed is a ConfigError before anything starts (`check`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from foundry.pretrain.config import ConfigError, KernelConfig

try:
    from flash_attn import flash_attn_func, flash_attn_varlen_func  # type: ignore[import-not-found]
except ImportError:
    flash_attn_func = flash_attn_varlen_func = None
try:
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine  # type: ignore[import-not-found]
except ImportError:
    fused_rms_norm_affine = None


def check(cfg: KernelConfig) -> None:
    """Refuse a kernel asked for by name that is not installed."""
    if cfg.attention == "flash-attn" and flash_attn_func is None:
        raise ConfigError("kernels.attention=flash-attn but flash_attn is not installed: `pip install flash-attn "
                          "--no-build-isolation` on a CUDA machine, or use kernels.attention=auto")
    if cfg.rmsnorm == "apex" and fused_rms_norm_affine is None:
        raise ConfigError("kernels.rmsnorm=apex but NVIDIA apex is not installed (not PyPI's `apex`): build it from "
                          "github.com/NVIDIA/apex with its CUDA extensions, or use kernels.rmsnorm=auto")


# Each module that runs a kernel holds its choice (the value of kernels.attention or kernels.rmsnorm), and
# the path is picked per call from that choice and the tensors: a model built on the meta device or the CPU
# runs its fast path on the GPU, and two models with different choices can share a process.


def attention_path(q: torch.Tensor, choice: str = "auto") -> str:
    """'flash-attn' or 'sdpa' for query tensors like `q` under kernels.attention=`choice`."""
    usable = flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    return "flash-attn" if usable and choice != "sdpa" else "sdpa"


def explain_attention(q: torch.Tensor, choice: str, documents: bool) -> str:
    """The attention path for queries like `q`, and why it is not flash-attn: for the start-up log."""
    path = attention_path(q, choice)
    why = "" if path == "flash-attn" else " (chosen)" if choice == "sdpa" else \
        " (flash-attn not installed)" if flash_attn_func is None else " (flash-attn needs CUDA bf16/fp16 tensors)"
    return path + (" with document masking" if documents else "") + why


class Documents:
    """Which document of its packed window each token belongs to (B, S), and what attention derives from
    that: built once per forward pass and shared by every layer, so the mask is not rebuilt per layer."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids
        self._mask: torch.Tensor | None = None
        self._varlen: tuple[torch.Tensor, int] | None = None

    def mask(self) -> torch.Tensor:
        """SDPA's boolean mask (B, 1, S, S): causal and within the same document."""
        if self._mask is None:
            S = self.ids.shape[1]
            causal = torch.ones(S, S, dtype=torch.bool, device=self.ids.device).tril()
            self._mask = ((self.ids[:, :, None] == self.ids[:, None, :]) & causal)[:, None]
        return self._mask

    def varlen(self) -> tuple[torch.Tensor, int]:
        """flash-attn's cu_seqlens and longest length: every document of every window as its own sequence."""
        if self._varlen is None:
            B, S = self.ids.shape
            starts = torch.ones_like(self.ids, dtype=torch.bool)
            starts[:, 1:] = self.ids[:, 1:] != self.ids[:, :-1]  # a new sequence at each window and document
            first = torch.nonzero(starts.flatten()).flatten()
            lengths = torch.diff(first, append=torch.tensor([B * S], device=first.device))
            self._varlen = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32), int(lengths.max())
        return self._varlen


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: Documents | None = None,
              choice: str = "auto") -> torch.Tensor:
    """Causal attention. q (B, S, H, Dh), k and v (B, S, K, Dh) with K dividing H -> (B, S, H, Dh).
    With `documents`, a token sees only the earlier tokens of its own document. Generating with a KV
    cache, q may be the one newest token (B, 1, H, Dh) of the sequence whose keys k and v hold."""
    if attention_path(q, choice) == "flash-attn":
        if documents is None:
            return flash_attn_func(q, k, v, causal=True)  # native GQA when K divides H
        cu_seqlens, max_len = documents.varlen()
        out = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seqlens, cu_seqlens,
                                     max_len, max_len, causal=True)
        return out.view(q.shape)
    # With documents SDPA takes the mask, and runs its masked (not flash) backend.
    mask = documents.mask() if documents is not None else None
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        is_causal=mask is None and q.shape[1] > 1,  # SDPA aligns its causal mask top-left: wrong for one new token
        enable_gqa=q.shape[2] != k.shape[2],
    )  # (B, H, S, Dh)
    return out.transpose(1, 2)


def rmsnorm_path(x: torch.Tensor, choice: str = "auto") -> str:
    """'apex' or 'torch' for inputs like `x` under kernels.rmsnorm=`choice`."""
    usable = fused_rms_norm_affine is not None and x.is_cuda
    return "apex" if usable and choice != "torch" else "torch"


def explain_rmsnorm(x: torch.Tensor, choice: str) -> str:
    """The RMSNorm path for inputs like `x`, and why it is not apex: for the start-up log."""
    path = rmsnorm_path(x, choice)
    return path + ("" if path == "apex" else " (apex not installed)" if fused_rms_norm_affine is None
                   else " (chosen)" if choice == "torch" else " (apex needs CUDA tensors)")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, choice: str = "auto") -> torch.Tensor:
    """weight * x / rms(x), normalised in fp32 as Llama does (bf16 sums of squares lose too much)."""
    if rmsnorm_path(x, choice) == "apex":
        return fused_rms_norm_affine(x, weight, weight.shape, eps)  # computes in fp32 internally
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over (B, S) targets, computed in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, targets), `chunk` tokens at a time: each chunk's fp32 logits exist
    only while it is computed, in forward and again (recomputed) in backward, never the whole (B*S, V)."""
    h, y = hidden.flatten(0, -2), targets.flatten()
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, h.shape[0], chunk):
        total = total + checkpoint(_summed_loss, h[start:start + chunk], weight, y[start:start + chunk],
                                   use_reentrant=False)
    return total / y.numel()


def _summed_loss(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((h @ weight.t()).float(), y, reduction="sum")


def optimizer_params(cfg: KernelConfig, device: torch.device) -> tuple[str, dict]:
    """The AdamW path and its DeepSpeed optimizer settings."""
    choice = cfg.optimizer
    if choice == "auto":
        choice = "torch-fused" if device.type == "cuda" else "torch"
    if choice == "deepspeed-fused":
        return "DeepSpeed FusedAdam (JIT-compiled CUDA op)", {"torch_adam": False}
    if choice == "torch-fused":
        return "torch AdamW, fused", {"torch_adam": True, "fused": True}
    return "torch AdamW, foreach", {"torch_adam": True}
