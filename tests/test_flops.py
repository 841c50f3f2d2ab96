"""Parameter and FLOP counts against figures published by the people who trained the models.

A published figure is rounded; `assert_rounds_to` takes it as printed and allows exactly that rounding
(half a unit of its last digit) and nothing more, so a count off by more than the paper's own
precision fails.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
import torch

from foundry.pretrain.config import ModelConfig, load_model_config
from foundry.pretrain.flops import device_peak_flops, flops_per_token, mfu
from foundry.pretrain.model import Llama, num_parameters

# Parameter counts published with the Hugging Face checkpoints (model cards / safetensors index).
PUBLISHED_PARAMS = {
    "llama2-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248,
    "llama3.2-1b": 1_235_814_400,
    "llama3-70b": 70_553_706_496,
}

# Llama 3 405B as published: Dubey et al. 2024, "The Llama 3 Herd of Models", Table 3 and section 3.2
# (126 layers, d_model 16384, FFN 53248, 128 heads, 8 key/value heads, RoPE theta 500000; the table
# rounds the vocabulary to 128,000, the released tokenizer has 128,256), 8192-token pre-training context.
LLAMA3_405B = ModelConfig(vocab_size=128256, hidden_size=16384, num_layers=126, num_heads=128, num_kv_heads=8,
                          ffn_hidden_size=53248, rope_theta=500000.0, max_seq_len=8192)


# PaLM as published: Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways", section 2:
# SwiGLU with d_ff = 4 d_model, multi-query attention (one key/value head), head size always 256,
# shared input/output embeddings, a 256k SentencePiece vocabulary; Table 1 gives layers, heads, d_model.
# 540B is left out: its 48 heads x 256 = 12288 is not its d_model of 18432, a shape ModelConfig cannot express.
def palm(layers: int, heads: int, d_model: int) -> ModelConfig:
    assert heads * 256 == d_model
    return ModelConfig(vocab_size=256_000, hidden_size=d_model, num_layers=layers, num_heads=heads, num_kv_heads=1,
                       ffn_hidden_size=4 * d_model, tie_embeddings=True, max_seq_len=2048)


PALM_8B = palm(32, 16, 4096)
PALM_62B = palm(64, 32, 8192)


def preset(name: str) -> ModelConfig:
    return load_model_config(f"configs/models/{name}.yaml")


def assert_rounds_to(value: float, published: str) -> None:
    """`value` rounds to `published`, a figure as printed: "8.63e9" allows +-0.005e9, "0.0550" +-0.00005."""
    half_unit = Decimal(1).scaleb(Decimal(published).as_tuple().exponent) / 2
    assert abs(Decimal(value) - Decimal(published)) <= half_unit, f"{value:.6g} does not round to {published}"


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_counts_match_published(name):
    assert num_parameters(preset(name)) == PUBLISHED_PARAMS[name]


def test_llama3_405b_parameter_count_matches_published():
    # The safetensors total of meta-llama/Llama-3.1-405B on Hugging Face, to the parameter.
    assert num_parameters(LLAMA3_405B) == 405_853_388_800


def test_parameter_count_matches_a_built_model():
    cfg = preset("llama3.2-1b")  # tied embeddings: counted once
    with torch.device("meta"):
        model = Llama(cfg)
    assert sum(p.numel() for p in model.parameters()) == num_parameters(cfg) == PUBLISHED_PARAMS["llama3.2-1b"]


def test_llama3_405b_training_compute_matches_the_paper():
    # "our flagship language model was pre-trained using 3.8 x 10^25 FLOPs ... 405B trainable parameters
    # on 15.6T text tokens" (Dubey et al. 2024, section 1). That figure is 6 N D: it leaves out the
    # attention-score term, as the paper's scaling-law compute does. A one-token context makes our
    # attention term vanish (1e-5 of the total), so the two count the same thing. The token count is
    # rounded too (15.55T-15.65T): the total must round to 3.8e25 for some token count in that range.
    per_token = flops_per_token(LLAMA3_405B, 1)
    assert per_token * 15.55e12 <= 3.85e25 and per_token * 15.65e12 >= 3.75e25, per_token * 15.6e12


@pytest.mark.parametrize(("cfg", "published_params", "published_tflops_per_token"),
                         [(PALM_8B, "8.63e9", "0.0550"), (PALM_62B, "62.50e9", "0.388")], ids=["palm-8b", "palm-62b"])
def test_palm_parameters_and_flops_per_token_match_the_paper(cfg, published_params, published_tflops_per_token):
    # Parameters: PaLM Table 1, in billions to two decimals. FLOPs per token: PaLM appendix B, Table 22,
    # "TFLOPs per token (non-attn + attn)" = 6N + 12 L H Q T at the 2048-token training context, with N
    # counting the shared embedding once: this checks the attention term and the tied output head.
    # PaLM's parallel blocks have one norm where ours have two: 64 x 8192 weights at most, far below rounding.
    assert_rounds_to(num_parameters(cfg), published_params)
    assert_rounds_to(flops_per_token(cfg, 2048) / 1e12, published_tflops_per_token)


def test_tied_head_still_counts_its_flops():
    cfg = preset("llama3.2-1b")
    untied = type(cfg)(**{**cfg.__dict__, "tie_embeddings": False})
    assert flops_per_token(cfg, 2048) == flops_per_token(untied, 2048)


def test_mfu():
    assert device_peak_flops(torch.device("cpu")) is None
    assert mfu(1e4, 1e9, None, 8) is None
    # PaLM appendix B: 540B at 238.3K tokens/s on 6144 TPU v4 chips of 275 peak TFLOP/s is
    # "45.7% without self-attention ((238.3 x 6 x 540)/(275 x 6144))".
    assert_rounds_to(mfu(238.3e3, 6 * 540e9, 275e12, 6144), "0.457")
