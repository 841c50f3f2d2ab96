"""Parameter and FLOP counts against the published figures of the presets."""

from __future__ import annotations

import pytest
import torch

from foundry.pretrain.config import load_model_config
from foundry.pretrain.flops import device_peak_flops, flops_per_token, mfu
from foundry.pretrain.model import Llama, num_parameters

# Parameter counts published with the Hugging Face checkpoints (model cards / safetensors index).
PUBLISHED_PARAMS = {
    "llama2-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248,
    "llama3.2-1b": 1_235_814_400,
    "llama3-70b": 70_553_706_496,
}


def preset(name: str):
    return load_model_config(f"configs/models/{name}.yaml")


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_counts_match_published(name):
    assert num_parameters(preset(name)) == PUBLISHED_PARAMS[name]


def test_parameter_count_matches_a_built_model():
    cfg = preset("llama3.2-1b")  # tied embeddings: counted once
    with torch.device("meta"):
        model = Llama(cfg)
    assert sum(p.numel() for p in model.parameters()) == num_parameters(cfg) == PUBLISHED_PARAMS["llama3.2-1b"]


def test_llama3_8b_flops_per_token_matches_published_figure():
    # Llama 3 8B: 8.03B parameters published, of which the 128256 x 4096 input embedding is a lookup
    # (no FLOPs); the standard count (Kaplan 2020, PaLM appendix B) is then 6 N plus the attention term
    # 12 * layers * d_model * context at the 8192-token training context: 57.9 GFLOP per token.
    n_matmul = 8.03e9 - 128256 * 4096
    published = 6 * n_matmul + 12 * 32 * 4096 * 8192
    assert flops_per_token(preset("llama3-8b"), 8192) == pytest.approx(published, rel=0.01)
    # Without the attention term the figure is the familiar 6N: within 1% at short context too.
    assert flops_per_token(preset("llama3-8b"), 1) == pytest.approx(6 * n_matmul, rel=0.01)


def test_tied_head_still_counts_its_flops():
    cfg = preset("llama3.2-1b")
    untied = type(cfg)(**{**cfg.__dict__, "tie_embeddings": False})
    assert flops_per_token(cfg, 2048) == flops_per_token(untied, 2048)


def test_mfu():
    assert device_peak_flops(torch.device("cpu")) is None
    assert mfu(1e4, 1e9, None, 8) is None
    # 1000 tokens/s at 6e11 FLOP/token on one 989 TFLOP/s H100 is 60.7%.
    assert mfu(1000, 6e11, 989e12, 1) == pytest.approx(0.6067, rel=1e-3)
