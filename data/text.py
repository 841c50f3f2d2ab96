"""Training batches read straight from text files, tokenized as UTF-8 bytes.

Documents (files) are visited in a seeded order, each followed by an end-of-document token,
and the token stream is cut into windows of seq_len + 1 tokens (inputs and shifted targets),
packed across document boundaries. The windows of optimizer step s are numbered
[s * global_batch, (s + 1) * global_batch); data-parallel rank r takes the r-th contiguous
slice of them. So the set of sequences in a step depends on the seed and the global batch,
never on how many ranks share it, and a resumed run continues at window s * global_batch.
"""

from __future__ import annotations

import random
from fnmatch import fnmatch
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

EOS = 256  # after the 256 byte values
VOCAB_SIZE = 257


def corpus_files(corpus: str, pattern: str, exclude: list[str]) -> list[Path]:
    """The corpus's files in a machine-independent (sorted) order."""
    root = Path(corpus)
    if root.is_file():
        return [root]
    files = (p for p in root.glob(pattern) if p.is_file())
    return sorted(p for p in files if not any(fnmatch(p.relative_to(root).as_posix(), x) for x in exclude))


def encode(text: bytes) -> np.ndarray:
    return np.frombuffer(text, dtype=np.uint8).astype(np.int64)


def decode(tokens: list[int]) -> str:
    return bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")


def windows(files: list[Path], seq_len: int, seed: int) -> Iterator[np.ndarray]:
    """Endless packed windows of seq_len + 1 tokens; the document order is reshuffled each epoch."""
    width = seq_len + 1
    buffer = np.empty(0, dtype=np.int64)
    epoch = 0
    while True:
        order = list(files)
        random.Random(seed + epoch).shuffle(order)
        for path in order:
            buffer = np.concatenate([buffer, encode(path.read_bytes()), [EOS]])
            n = len(buffer) // width
            for i in range(n):
                yield buffer[i * width : (i + 1) * width]
            buffer = buffer[n * width :]
        epoch += 1


def micro_batches(
    files: list[Path], seq_len: int, seed: int, global_batch: int, micro_batch: int,
    dp_rank: int, dp_size: int, start_step: int = 0,
) -> Iterator[torch.Tensor]:
    """This rank's micro-batches (micro_batch, seq_len + 1), in step order from `start_step`."""
    per_rank = global_batch // dp_size
    stream = windows(files, seq_len, seed)
    for _ in range(start_step * global_batch):
        next(stream)
    while True:
        step = [next(stream) for _ in range(global_batch)]
        mine = step[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        for i in range(0, per_rank, micro_batch):
            yield torch.from_numpy(np.stack(mine[i : i + micro_batch]))
