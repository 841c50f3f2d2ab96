"""The Llama model's defining properties, each checked against an independent reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers  # a test dependency (pip install -e .[test]): the equivalence tests must not be skipped

from foundry.pretrain.config import ModelConfig, RopeScalingConfig
from foundry.pretrain.model import Attention, Llama, ModelOptions, apply_rope, initial_value, rope_cos_sin, rope_frequencies


def test_causal_masking(tiny):
    torch.manual_seed(0)
    model = Llama(tiny).eval()
    tokens = torch.randint(0, tiny.vocab_size, (2, 32))
    t = 17
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 1) % tiny.vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :t], b[:, :t]), "a later token changed earlier logits"
    assert not torch.allclose(a[:, t], b[:, t]), "the changed token had no effect at its own position"


def test_rope_is_a_rotation(tiny):
    head_dim = tiny.hidden_size // tiny.num_heads
    cos, sin = rope_cos_sin(rope_frequencies(head_dim, tiny), 64)
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, head_dim), torch.randn(1, 1, 1, head_dim)

    def at(x: torch.Tensor, pos: int) -> torch.Tensor:
        return apply_rope(x, cos[pos : pos + 1], sin[pos : pos + 1]).flatten()

    for pos in (0, 5, 63):
        assert torch.allclose(at(q, pos).norm(), q.norm(), rtol=1e-6)
    assert torch.allclose(at(q, 0), q.flatten())
    # The score depends only on the offset between the two positions.
    scores = [torch.dot(at(q, m), at(k, m - 3)) for m in (3, 10, 40, 63)]
    for s in scores[1:]:
        assert torch.allclose(s, scores[0], atol=1e-5)
    assert not torch.allclose(torch.dot(at(q, 10), at(k, 7)), torch.dot(at(q, 10), at(k, 2)), atol=1e-4)


def _reference_mha(attn: Attention, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """Textbook multi-head attention: explicit softmax(QK^T/sqrt(d) + mask) V."""
    B, S, _ = x.shape
    d = attn.head_dim
    q = apply_rope(attn.q_proj(x).view(B, S, -1, d), cos, sin).transpose(1, 2)
    k = apply_rope(attn.k_proj(x).view(B, S, -1, d), cos, sin).transpose(1, 2)
    v = attn.v_proj(x).view(B, S, -1, d).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    return attn.o_proj(out.transpose(1, 2).reshape(B, S, -1))


def test_gqa_with_all_kv_heads_is_multi_head_attention(tiny):
    cfg = ModelConfig(**{**tiny.__dict__, "num_kv_heads": tiny.num_heads})
    torch.manual_seed(0)
    attn = Attention(cfg)
    x = torch.randn(2, 16, cfg.hidden_size)
    cos, sin = rope_cos_sin(rope_frequencies(attn.head_dim, cfg), 16)
    torch.testing.assert_close(attn(x, cos, sin), _reference_mha(attn, x, cos, sin), rtol=1e-5, atol=1e-6)


def test_gqa_equals_mha_with_shared_kv_heads(tiny):
    """Grouped-query attention is MHA whose kv heads are copied to each group of query heads."""
    torch.manual_seed(0)
    gqa = Attention(tiny)
    mha = Attention(ModelConfig(**{**tiny.__dict__, "num_kv_heads": tiny.num_heads}))
    group, d = tiny.num_heads // tiny.num_kv_heads, gqa.head_dim
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(tiny.num_kv_heads, d, -1)
            getattr(mha, name).weight.copy_(w.repeat_interleave(group, dim=0).reshape(-1, tiny.hidden_size))
    x = torch.randn(2, 16, tiny.hidden_size)
    cos, sin = rope_cos_sin(rope_frequencies(d, tiny), 16)
    torch.testing.assert_close(gqa(x, cos, sin), mha(x, cos, sin), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["plain", "llama3-rope-tied"])
def test_logits_match_transformers(tiny, variant):
    cfg = tiny
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if variant != "plain":
        cfg = ModelConfig(**{**tiny.__dict__, "tie_embeddings": True, "rope_theta": 500000.0,
                             "rope_scaling": RopeScalingConfig(factor=8.0, original_max_seq_len=16)})
        s = cfg.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_seq_len}
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len, rope_parameters=rope,
        tie_word_embeddings=cfg.tie_embeddings, attn_implementation="eager",
    )
    torch.manual_seed(0)
    ours = Llama(cfg).eval()
    with torch.no_grad():  # non-trivial norm gains, so a swapped norm would show
        for name, p in ours.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    # The frequencies themselves first: logits of a small-init model are only mildly sensitive to them.
    head_dim = cfg.hidden_size // cfg.num_heads
    torch.testing.assert_close(rope_frequencies(head_dim, cfg), hf.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_residual_projections_get_scaled_init():
    cfg = ModelConfig(hidden_size=256, num_layers=8, num_heads=4, num_kv_heads=4, ffn_hidden_size=512)
    torch.manual_seed(0)
    model = Llama(cfg)
    q_std = model.model.layers["0"].self_attn.q_proj.weight.std().item()
    o_std = model.model.layers["0"].self_attn.o_proj.weight.std().item()
    assert q_std == pytest.approx(cfg.init_std, rel=0.05)
    assert o_std == pytest.approx(cfg.init_std / math.sqrt(2 * cfg.num_layers), rel=0.05)


def test_tiny_model_overfits_one_batch(tiny):
    torch.manual_seed(0)
    model = Llama(tiny)
    batch = torch.randint(0, tiny.vocab_size, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 5.0  # ~ln(300) at init
    assert losses[-1] < 0.1, f"did not memorise one batch: loss {losses[0]:.2f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_a_model_built_on_the_meta_device_and_materialised_equals_one_built_directly(tiny, tie_embeddings):
    tiny = ModelConfig(**{**tiny.__dict__, "tie_embeddings": tie_embeddings})
    direct = Llama(tiny, seed=7)
    with torch.device("meta"):
        deferred = Llama(tiny)
    assert all(p.is_meta for p in deferred.parameters())  # nothing allocated yet
    deferred.materialize(lambda name, p: initial_value(name, tuple(p.shape), tiny, 7), "cpu")
    assert (deferred.lm_head.weight is deferred.model.embed_tokens.weight) == tie_embeddings
    assert len(list(deferred.parameters())) == len(list(direct.parameters()))
    expected = direct.state_dict()
    for name, value in deferred.state_dict().items():
        assert torch.equal(value, expected[name]), name
    for name in ("rope_cos", "rope_sin"):  # the buffers checkpoints leave out
        assert torch.equal(getattr(deferred, name), getattr(direct, name)), name
    tokens = torch.randint(0, tiny.vocab_size, (2, 16))
    assert torch.equal(deferred(tokens), direct(tokens))


def test_a_parameters_initial_value_depends_on_the_seed_and_its_name_alone(tiny):
    """What makes every layout start from the same model: a rank computes a parameter's value without knowing
    what else is built, or in which order."""
    shape = (64, 32)
    a = initial_value("model.layers.1.mlp.up_proj.weight", shape, tiny, seed=3)
    assert torch.equal(a, initial_value("model.layers.1.mlp.up_proj.weight", shape, tiny, seed=3))
    assert not torch.equal(a, initial_value("model.layers.1.mlp.up_proj.weight", shape, tiny, seed=4))
    assert not torch.equal(a, initial_value("model.layers.0.mlp.up_proj.weight", shape, tiny, seed=3))
    torch.manual_seed(0)  # torch's global generator plays no part
    assert torch.equal(a, initial_value("model.layers.1.mlp.up_proj.weight", shape, tiny, seed=3))
    assert a.std().item() == pytest.approx(tiny.init_std, rel=0.1)


def test_two_models_with_different_recomputation_coexist_and_compute_the_same(tiny):
    """Activation checkpointing is a per-model option: two models in one process keep their own."""
    torch.manual_seed(0)
    stored = Llama(tiny)
    torch.manual_seed(0)
    recomputed = Llama(tiny, ModelOptions(recompute_every=2))  # blocks 0, 2, ...
    assert [b.recompute for b in stored.model.layers.values()] == [False, False]
    assert [b.recompute for b in recomputed.model.layers.values()] == [True, False]
    calls = {}  # (model, block): attention forward passes, counted in forward and (recomputed) in backward
    for model_name, m in (("stored", stored), ("recomputed", recomputed)):
        for i, block in m.model.layers.items():
            key = (model_name, i)
            block.self_attn.register_forward_hook(lambda *_, key=key: calls.__setitem__(key, calls.get(key, 0) + 1))
    tokens = torch.randint(0, tiny.vocab_size, (2, 17))
    losses = [m(tokens[:, :-1], tokens[:, 1:]) for m in (stored, recomputed)]
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    grads = [torch.autograd.grad(loss, list(m.parameters())) for loss, m in zip(losses, (stored, recomputed))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert calls == {("stored", "0"): 1, ("stored", "1"): 1, ("recomputed", "0"): 2, ("recomputed", "1"): 1}
