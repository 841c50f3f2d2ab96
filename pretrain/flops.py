"""Training FLOPs per token and model FLOPs utilisation (MFU).

The count is the standard one (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B):
6 FLOPs per token for every parameter that takes part in a matrix multiply (forward 2,
backward 4), plus the attention scores and weighted sum, 12 * layers * heads * head_dim *
seq_len. The input embedding is a lookup, not a matmul, so it is left out; the output head is in.
Activation recomputation is not counted: MFU measures useful model work. The terms (per block, the
head, the embedding) live in foundry.parallel.stages, which balances pipeline stages by them.
"""

from __future__ import annotations

import torch

from foundry.parallel.planner import ModelShape
from foundry.parallel.stages import EMBEDDING_FLOPS, block_flops, head_flops
from foundry.pretrain.config import ModelConfig

# Dense bf16 tensor-core peak per device, FLOP/s, from the vendors' data sheets (no sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,  # also "H100 80GB HBM3"
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "MI300X": 1307e12,
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    shape = ModelShape.of(cfg)  # a tied head still multiplies: head_flops counts it either way
    return float(EMBEDDING_FLOPS + cfg.num_layers * block_flops(shape, seq_len) + head_flops(shape))


def device_peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of one device, or None where there is no meaningful figure (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and ("HBM3" in name or "SXM" in name):
        return PEAK_BF16_FLOPS["H100 SXM"]
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if all(part in name for part in key.split()):
            return PEAK_BF16_FLOPS[key]
    return None


def mfu(tokens_per_second: float, flops_token: float, peak_per_device: float | None, devices: int) -> float | None:
    if peak_per_device is None:
        return None
    return tokens_per_second * flops_token / (peak_per_device * devices)
