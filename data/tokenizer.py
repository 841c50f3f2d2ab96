"""Tokenizers: a Hugging Face `tokenizers` tokenizer.json given by path (e.g. Llama 3's), or a
byte-level BPE trained on the input when none is given. Identified by a fingerprint so shards
are never read with the wrong vocabulary."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TOKENIZER_FILE = "tokenizer.json"  # its name next to a dataset's manifest and in every checkpoint

# End-of-document tokens of well-known tokenizers, tried in order; ours is the first.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


class DataError(ValueError):
    """Bad input data; the message names the file and the fix."""


def train_byte_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A GPT-2-style byte-level BPE: every byte is a base token, so any UTF-8 text encodes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_CANDIDATES[0]], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load(path: str | Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise DataError(f"cannot read tokenizer {path}: {e}; pass a Hugging Face tokenizer.json") from None


def eos_id(tok: Tokenizer, path: str = "the tokenizer") -> int:
    for token in EOS_CANDIDATES:
        token_id = tok.token_to_id(token)
        if token_id is not None:
            return token_id
    raise DataError(f"{path} has none of the end-of-document tokens {EOS_CANDIDATES}: add one to it")


def fingerprint(tok: Tokenizer) -> str:
    """sha256 of the canonical JSON: equal fingerprints mean identical token ids."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def encode_documents(tok: Tokenizer, texts: list[str]) -> Iterator[list[int]]:
    """Token ids of each document followed by the end-of-document token."""
    eos = eos_id(tok)
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        yield [*enc.ids, eos]
