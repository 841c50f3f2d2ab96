"""`foundry prepare-data`: raw text -> token ids -> webdataset tar shards + manifest.json.

Inputs are files, directories (searched with a glob) or globs: plain text (each file one
document) or .jsonl (one document per line, in a text field), either optionally .gz or .zst.
Each document is tokenized, followed by the end-of-document token, and the token stream is cut
into samples of `sample_tokens` ids stored as `tokens.npy` in the smallest unsigned dtype that
holds the vocabulary; a shard closes after `shard_tokens` tokens. The shards are plain tars
that `tar tf` lists and webdataset reads. The manifest is written last and atomically: a
directory without one is an unfinished preparation.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import os
import zlib
from dataclasses import dataclass, field
from fnmatch import fnmatch
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from foundry.data import tokenizer as tk
from foundry.data.tokenizer import DataError

log = logging.getLogger("foundry")

MANIFEST = "manifest.json"
HOLDOUT = "holdout"  # the validation set's subdirectory
FORMAT = "foundry-shards/1"


def _option(default: Any, text: str, **argparse: Any) -> Any:
    """A field that is also a `foundry prepare-data` option: its help text and any argparse settings."""
    return field(default=default, metadata={"help": text, "argparse": argparse})


@dataclass
class PrepareOptions:
    """What `foundry prepare-data` does besides its inputs; the command's options are these fields."""

    out: Path = _option(None, "output directory for shards, tokenizer.json and manifest.json", type=Path,
                        required=True)
    tokenizer: str | None = _option(None, "a Hugging Face tokenizer.json; default: train a byte-level BPE on the input")
    vocab_size: int = _option(4096, "vocabulary of the trained BPE", type=int)
    pattern: str = _option("**/*", "glob of files inside input directories")
    exclude: tuple[str, ...] = _option((), "glob (relative to an input directory) to skip; repeatable",
                                       action="append", type=str)
    text_field: str = _option("text", "field holding the document in .jsonl")
    sample_tokens: int = _option(16384, "token ids per stored sample", type=int)
    shard_tokens: int = _option(50_000_000, "close a shard after this many tokens", type=int)
    workers: int = _option(os.cpu_count() or 1, "tokenizing processes (default: every core)", type=int)
    on_error: str = _option("stop", "an unreadable, empty or non-UTF-8 file: stop, or skip it (counted, logged)",
                            choices=["stop", "skip"])
    holdout: float = _option(0.0, "fraction of the input files (chosen by a hash of their path) written instead to "
                                  "OUT/holdout, a validation set with the same tokenizer (0: none)", type=float)


def find_inputs(inputs: list[str], pattern: str, exclude: tuple[str, ...]) -> list[Path]:
    """Every input file, in a stable order."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = [p for p in path.glob(pattern) if p.is_file()]
            files += sorted(p for p in found if not any(fnmatch(p.relative_to(path).as_posix(), x) for x in exclude))
        elif path.is_file():
            files.append(path)
        else:
            matched = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matched:
                raise DataError(f"input {item} matches no file: pass existing files, directories or globs")
            files += matched
    if not files:
        raise DataError(f"no input files found in {inputs} (pattern {pattern!r}): check the paths and --pattern")
    return files


def read_documents(path: Path, text_field: str) -> list[str]:
    """The documents of one file; DataError naming the file for anything unreadable."""
    name = path.name
    if name.endswith(".gz"):
        raw, name = gzip.open(path, "rb").read(), name[:-3]
    elif name.endswith(".zst"):
        import zstandard

        with open(path, "rb") as f:
            raw = zstandard.ZstdDecompressor().stream_reader(f).read()
        name = name[:-4]
    else:
        raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path} is empty: remove it or fill it")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 (byte {e.start}): re-encode it as UTF-8") from None
    if not name.endswith(".jsonl"):
        return [text]
    docs = []
    for number, line in enumerate(io.StringIO(text), 1):
        if not line.strip():
            continue
        try:
            docs.append(json.loads(line)[text_field])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path} line {number} is not a JSON object with a {text_field!r} string: fix it "
                            f"or set --text-field") from None
    return docs


_worker_tok = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tok
    _worker_tok = tk.Tokenizer.from_str(tokenizer_json)


def _tokenize_file(job: tuple[Path, str]) -> tuple[Path, np.ndarray | str]:
    path, text_field = job
    try:
        docs = read_documents(path, text_field)
    except (DataError, OSError, EOFError) as e:
        return path, str(e)
    ids = [i for doc in tk.encode_documents(_worker_tok, docs) for i in doc]
    return path, np.asarray(ids, dtype=np.int64)


def token_dtype(vocab_size: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise DataError(f"vocabulary of {vocab_size} tokens does not fit 32 bits")


class ShardWriter:
    """Appends token ids; emits fixed-size samples into tar shards that close at `shard_tokens`."""

    def __init__(self, out: Path, dtype: np.dtype, sample_tokens: int, shard_tokens: int):
        self.out, self.dtype, self.sample_tokens, self.shard_tokens = out, dtype, sample_tokens, shard_tokens
        self.pending = np.empty(0, dtype=dtype)
        self.shards: list[dict] = []
        self.writer: Any = None  # webdataset's TarWriter while a shard is open
        self.samples = 0

    def add(self, ids: np.ndarray) -> None:
        self.pending = np.concatenate([self.pending, ids.astype(self.dtype)])
        while len(self.pending) >= self.sample_tokens:
            self._write(self.pending[: self.sample_tokens])
            self.pending = self.pending[self.sample_tokens :]

    def _write(self, sample: np.ndarray) -> None:
        if self.writer is None:
            name = f"shard-{len(self.shards):06d}.tar"
            self.shards.append({"url": name, "samples": 0, "tokens": 0})
            import webdataset as wds  # here, not at the top: it imports torch, which `foundry --help` need not

            self.writer = wds.TarWriter(str(self.out / name))
        self.writer.write({"__key__": f"{self.samples:010d}", "tokens.npy": sample})
        self.samples += 1
        shard = self.shards[-1]
        shard["samples"] += 1
        shard["tokens"] += len(sample)
        if shard["tokens"] >= self.shard_tokens:
            self.writer.close()
            self.writer = None

    def close(self) -> list[dict]:
        if len(self.pending):
            self._write(self.pending)  # the last sample may be short
        if self.writer is not None:
            self.writer.close()
        return self.shards


def prepare(inputs: list[str], opts: PrepareOptions) -> dict:
    """Tokenize `inputs` into shards under opts.out; returns the manifest."""
    files = find_inputs(inputs, opts.pattern, opts.exclude)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / MANIFEST).unlink(missing_ok=True)  # the directory is incomplete until the end
    if opts.tokenizer:
        tok = tk.load(opts.tokenizer)
    else:
        log.info("training a byte-level BPE tokenizer (vocab %d) on %d files", opts.vocab_size, len(files))
        tok = tk.train_byte_bpe(_texts_for_training(files, opts), opts.vocab_size)
    tok.save(str(opts.out / tk.TOKENIZER_FILE))
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)
    writer = ShardWriter(opts.out, dtype, opts.sample_tokens, opts.shard_tokens)
    held_out = None
    if opts.holdout:
        (opts.out / HOLDOUT).mkdir(exist_ok=True)
        (opts.out / HOLDOUT / MANIFEST).unlink(missing_ok=True)
        tok.save(str(opts.out / HOLDOUT / tk.TOKENIZER_FILE))
        held_out = ShardWriter(opts.out / HOLDOUT, dtype, opts.sample_tokens, opts.shard_tokens)
    skipped: list[str] = []
    jobs = [(f, opts.text_field) for f in files]
    with Pool(opts.workers, initializer=_init_worker, initargs=(tok.to_str(),)) as pool:
        progress = tqdm(pool.imap(_tokenize_file, jobs, chunksize=8), total=len(jobs), unit="file", desc="tokenizing")
        for path, result in progress:
            if isinstance(result, str):
                if opts.on_error == "stop":
                    raise DataError(result)
                skipped.append(str(path))
                if len(skipped) <= 5:
                    log.warning("skipped: %s%s", result, " (further skips are counted, not shown)" if len(skipped) == 5 else "")
                continue
            (held_out if held_out and is_held_out(path, opts.holdout) else writer).add(result)
    if held_out:
        _write_manifest(opts.out / HOLDOUT, tok, dtype, opts.sample_tokens, held_out.close(), [])
    return _write_manifest(opts.out, tok, dtype, opts.sample_tokens, writer.close(), skipped)


def is_held_out(path: Path, fraction: float) -> bool:
    """Whether a file belongs to the validation set: by a hash of its path, so the split never changes."""
    return zlib.crc32(str(path).encode()) / 2**32 < fraction


def _write_manifest(out: Path, tok, dtype: np.dtype, sample_tokens: int, shards: list[dict],
                    skipped: list[str]) -> dict:
    """Last and atomically: a directory without a manifest is an unfinished preparation."""
    manifest = {
        "format": FORMAT,
        "tokenizer": {"fingerprint": tk.fingerprint(tok), "vocab_size": tok.get_vocab_size(),
                      "eos_id": tk.eos_id(tok), "file": tk.TOKENIZER_FILE},
        "dtype": dtype.name,
        "sample_tokens": sample_tokens,
        "total_tokens": sum(s["tokens"] for s in shards),
        "documents_skipped": skipped,
        "shards": shards,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    log.info("wrote %d shards, %d tokens (%s) to %s; %d files skipped", len(shards), manifest["total_tokens"],
             dtype.name, out, len(skipped))
    return manifest


def _texts_for_training(files: list[Path], opts: PrepareOptions):
    for path in files:
        try:
            yield from read_documents(path, opts.text_field)
        except DataError:
            if opts.on_error == "stop":
                raise  # the same files are skipped, and reported, when tokenizing
