"""Data pipeline throughput, side by side with a reference in the same run.

1. prepare: `foundry prepare-data`'s tokens/s (reading files, tokenizing, writing shards) against
   the tokenizer's own `encode_batch` on the same texts (tokenizing only, in memory).
2. loader: packed training batches (seq_len 2048, micro-batch 8) per second from the shard
   stream, in-process and with a loader worker, against slicing the same tokens from a numpy
   memmap (the lower bound of any loader: no tar parsing, no packing bookkeeping).

    python benchmarks/data_pipeline.py [--seconds 5]

Uses the Python standard library's source as text (as the quickstart does).
"""

from __future__ import annotations

import argparse
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

from foundry.data import tokenizer as tk
from foundry.data.prepare import PrepareOptions, find_inputs, prepare, read_documents
from foundry.data.stream import ShardLoader, open_dataset, read_shard

SEQ, MICRO = 2048, 8


def rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds / 1e6:8.2f}M"


def bench_prepare(work: Path, workers: int) -> tuple[list[tuple[str, str]], Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    inputs = [str(stdlib / p) for p in ("email", "json", "logging", "asyncio", "unittest", "xml", "http")]
    files = find_inputs(inputs, "**/*.py", ())
    texts = []
    for f in files:
        try:
            texts += read_documents(f, "text")
        except tk.DataError:
            pass
    tok = tk.train_byte_bpe(texts, 4096)
    tok_path = work / "tokenizer.json"
    tok.save(str(tok_path))

    start = time.perf_counter()
    encoded = tok.encode_batch(texts, add_special_tokens=False)
    ref_s = time.perf_counter() - start
    ref_tokens = sum(len(e.ids) for e in encoded)

    out = work / "shards"
    start = time.perf_counter()
    manifest = prepare(inputs, PrepareOptions(out=out, tokenizer=str(tok_path), pattern="**/*.py",
                                              shard_tokens=100_000, workers=workers, on_error="skip"))
    ours_s = time.perf_counter() - start
    rows = [
        (f"tokenizer.encode_batch, in memory ({len(texts)} docs)", rate(ref_tokens, ref_s)),
        (f"foundry prepare-data, files -> shards ({workers} workers)", rate(manifest["total_tokens"], ours_s)),
    ]
    return rows, out


def bench_loader(shards: Path, seconds: float) -> list[tuple[str, str]]:
    ds = open_dataset(str(shards))
    rows = []
    for workers in (0, 1):
        loader = ShardLoader([ds], seq_len=SEQ, micro_batch=MICRO, seed=0, streams=4, workers=workers,
                             dp_rank=0, dp_size=1)
        it = iter(loader)
        next(it)  # start-up (workers, first shard) is not throughput
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            n += next(it).numel()
        rows.append((f"ShardLoader, packed batches ({workers} workers)", rate(n, time.perf_counter() - start)))

    manifest = ds.manifest
    tokens = np.concatenate([s for shard in manifest["shards"]
                             for s in read_shard(str(shards / shard["url"]), manifest["tokenizer"]["vocab_size"])])
    path = shards / "all.u16"
    tokens.astype(np.uint16).tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    import torch

    rng = np.random.default_rng(0)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        offsets = rng.integers(0, len(mm) - SEQ - 1, size=MICRO)
        batch = torch.from_numpy(np.stack([mm[o : o + SEQ + 1] for o in offsets]).astype(np.int64))
        n += batch.numel()
    rows.append(("numpy memmap, random windows (reference)", rate(n, time.perf_counter() - start)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per loader row")
    parser.add_argument("--workers", type=int, default=2, help="prepare-data worker processes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prep_rows, shards = bench_prepare(Path(tmp), args.workers)
        loader_rows = bench_loader(shards, args.seconds)
    print(f"\n| what (seq_len {SEQ}, micro-batch {MICRO} for loaders) | tokens/s |")
    print("| --- | ---: |")
    for what, r in prep_rows + loader_rows:
        print(f"| {what} | {r} |")


if __name__ == "__main__":
    main()
