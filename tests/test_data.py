"""The text batches: a step's sequences depend on the global batch, not on the layout."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from data.text import EOS, corpus_files, decode, micro_batches, windows


def _corpus(tmp_path: Path) -> list[Path]:
    for i in range(6):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * (20 + 7 * i))
    (tmp_path / "skip").mkdir()
    (tmp_path / "skip" / "x.txt").write_text("excluded")
    return corpus_files(str(tmp_path), "**/*.txt", ["skip/*"])


def test_corpus_files_sorted_and_excluded(tmp_path):
    files = _corpus(tmp_path)
    assert [f.name for f in files] == [f"doc{i}.txt" for i in range(6)]


def test_windows_pack_every_document_with_eos(tmp_path):
    files = _corpus(tmp_path)
    total = sum(f.stat().st_size + 1 for f in files)
    seq = 31
    stream = list(itertools.islice(windows(files, seq, seed=0), total // (seq + 1)))
    tokens = torch.from_numpy(__import__("numpy").concatenate(stream)).tolist()
    assert all(len(w) == seq + 1 for w in stream)
    assert tokens.count(EOS) >= 5  # documents are packed across window boundaries
    text = decode(tokens)
    assert "document 3 document 3" in text


def _steps(files, ranks: int, micro: int, steps: int, start: int = 0) -> list[torch.Tensor]:
    """The global batch of each step, assembled from every rank's micro-batches in rank order."""
    global_batch = 8
    per_rank = [micro_batches(files, 15, 7, global_batch, micro, r, ranks, start) for r in range(ranks)]
    out = []
    for _ in range(steps):
        parts = [next(it) for it in per_rank for _ in range(global_batch // ranks // micro)]
        out.append(torch.cat(parts))
    return out


def test_layout_does_not_change_a_steps_sequences(tmp_path):
    files = _corpus(tmp_path)
    one = _steps(files, ranks=1, micro=8, steps=4)
    for ranks, micro in ((2, 4), (2, 2), (4, 1)):
        # each rank's slice, in rank order, is the single-process batch
        many = _steps(files, ranks=ranks, micro=micro, steps=4)
        for a, b in zip(one, many):
            assert torch.equal(a, b)


def test_start_step_continues_the_stream(tmp_path):
    files = _corpus(tmp_path)
    full = _steps(files, ranks=2, micro=2, steps=5)
    resumed = _steps(files, ranks=2, micro=2, steps=2, start=3)
    assert torch.equal(full[3], resumed[0]) and torch.equal(full[4], resumed[1])
    assert not torch.equal(full[0], full[1])
