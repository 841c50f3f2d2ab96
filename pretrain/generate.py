"""Text from a checkpoint, for eyeballing a run: greedy or sampled (temperature, top-p), with a KV cache.

`foundry generate CHECKPOINT --prompt TEXT` joins the checkpoint's weights from its per-rank files
(pretrain/reshard.py, any layout) into one plain `Llama` on this machine (CPU or GPU), with the tokenizer
saved with it: no process group.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from foundry.data import tokenizer as tk
from foundry.pretrain.checkpoint import CheckpointError, verify
from foundry.pretrain.reshard import full_weights
from foundry.pretrain.config import ModelConfig, RopeScalingConfig
from foundry.pretrain.model import KVCache, Llama


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy when temperature is 0; else sample from the smallest set of tokens whose probability reaches top_p."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the first token is always kept
    sorted_probs = sorted_probs * keep
    return int(order[torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)])


@torch.no_grad()
def generate(model: Llama, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             stop: int | None = None, seed: int = 0, use_cache: bool = True) -> list[int]:
    """The new token ids after `prompt` (at most max_new_tokens, ending early at `stop` or the context
    length). Without the cache every step recomputes the whole sequence: the reference the cache is tested on."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    budget = min(max_new_tokens, model.cfg.max_seq_len - len(prompt))
    if not prompt or budget <= 0:
        raise ValueError(f"the prompt has {len(prompt)} tokens: it must have 1 to {model.cfg.max_seq_len - 1}")
    cache = KVCache() if use_cache else None
    sequence = list(prompt)
    logits = model(torch.tensor([sequence], device=device), cache=cache)[0, -1]
    new: list[int] = []
    while len(new) < budget:
        token = next_token(logits, temperature, top_p, generator)
        new.append(token)
        sequence.append(token)
        if token == stop or len(new) == budget:
            break
        step_input = [token] if use_cache else sequence
        logits = model(torch.tensor([step_input], device=device), cache=cache)[0, -1]
    return new


def load_for_generation(tag_dir: Path, device: torch.device) -> tuple[Llama, Tokenizer]:
    """The model and tokenizer of a complete checkpoint, whatever layout wrote it (ZeRO 1-3)."""
    info = verify(tag_dir, {})
    saved = info["identity"]["model"]
    scaling = saved.get("rope_scaling")
    cfg = ModelConfig(**{**saved, "rope_scaling": RopeScalingConfig(**scaling) if scaling else None})
    if not (tag_dir / tk.TOKENIZER_FILE).is_file():
        raise CheckpointError(f"{tag_dir} has no {tk.TOKENIZER_FILE}: it was written before checkpoints carried their "
                              f"tokenizer; copy the run's tokenizer.json into it")
    model = Llama(cfg)
    model.load_state_dict(full_weights(tag_dir, info, cfg.vocab_size, cfg.tie_embeddings))
    return model.to(device).eval(), tk.load(str(tag_dir / tk.TOKENIZER_FILE))

