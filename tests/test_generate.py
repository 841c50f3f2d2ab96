"""Generation: the KV cache gives the same tokens as recomputing the whole sequence each step."""

from __future__ import annotations

import torch

from foundry.pretrain.generate import generate, next_token
from foundry.pretrain.model import KVCache, Llama


def test_greedy_generation_with_the_kv_cache_equals_recomputing_the_sequence(tiny):
    torch.manual_seed(0)
    model = Llama(tiny).eval()
    with torch.no_grad():  # sharpen the random model so that greedy picks are far from ties
        model.lm_head.weight.mul_(20)
    prompt = [5, 17, 42, 7, 99]
    cached = generate(model, prompt, max_new_tokens=40)
    assert cached == generate(model, prompt, max_new_tokens=40, use_cache=False)
    assert len(cached) == 40 and len(set(cached)) > 3  # not one token repeated: the test can tell them apart


def test_cached_logits_match_the_full_forward(tiny):
    torch.manual_seed(1)
    model = Llama(tiny).eval()
    tokens = torch.randint(0, tiny.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache()
        steps = [model(tokens[:, :8], cache=cache)] + [model(tokens[:, i:i + 1], cache=cache) for i in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_sampling_keeps_to_the_top_p_nucleus():
    logits = torch.tensor([4.0, 3.0, 0.0, -1.0])  # probabilities ~ 0.71, 0.26, 0.013, 0.005
    picks = {next_token(logits, 1.0, 0.9, torch.Generator().manual_seed(s)) for s in range(200)}
    assert picks == {0, 1}
    assert next_token(logits, 0.0, 0.9, None) == 0
    wide = {next_token(logits, 1.0, 1.0, torch.Generator().manual_seed(s)) for s in range(400)}
    assert 2 in wide
