"""Packed training windows streamed from token shards, resumable to the exact token.

The unit of reading is a *stream*: `data.streams` independent readers, fixed for a run. In each
epoch the shards of a dataset are permuted with the seed, and stream s reads positions
s, s + S, s + 2S, ... of that order, so every token is read once per epoch across streams.
Within a shard (the shuffle buffer: a shard's samples are held in memory) samples are read in a
seeded permutation. A stream's tokens are packed into windows of seq_len + 1 tokens across
sample and document boundaries; with several datasets, each window comes from one dataset
drawn with the configured weights.

Window j of the global sequence comes from stream j % S. Data-parallel rank r owns streams
r, r + dp, ...; its loader workers split those. A step's windows are j in [t*G, (t+1)*G) for
global batch G, so *what* a step trains on does not depend on dp or the number of workers,
only on the seed, S and G (S must divide G, and dp x workers must divide S).

A stream is produced in blocks of ~64k tokens (one message per block from a loader worker).
Its position is the state at the start of the current block (per dataset: epoch, shard,
sample, token offset) plus the windows consumed from the block: a few numbers, saved in
checkpoints. Resuming regenerates that block (re-reading the current shard) and skips the
consumed windows, so training continues at the exact next token. Changing dp or workers between runs keeps the exact
continuation as long as dp x workers still divides S; changing S is refused.
"""

from __future__ import annotations

import io
import json
import logging
import re
import signal
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from foundry.data.prepare import FORMAT, MANIFEST
from foundry.data.tokenizer import DataError

log = logging.getLogger("foundry")

MIX_BLOCK = 4096  # dataset choices are drawn in blocks of this many windows: one RNG per block
BLOCK_TOKENS = 65536  # a stream is produced in blocks of about this many tokens (see block_windows)


@dataclass
class Dataset:
    """One prepared dataset: its manifest and where its shards are read from."""

    name: str
    manifest: dict[str, Any]
    urls: list[str]
    weight: float

    @property
    def tokenizer_file(self) -> Path:
        """The tokenizer the shards were written with: next to the manifest."""
        return manifest_path(self.name).parent / self.manifest["tokenizer"]["file"]


def manifest_path(path: str) -> Path:
    """A dataset's manifest: `path` is the directory holding it, or the file itself."""
    return Path(path) / MANIFEST if Path(path).is_dir() else Path(path)


def open_dataset(path: str, weight: float = 1.0, urls: str | None = None) -> Dataset:
    """Read a manifest (a directory holding manifest.json, or the file); shards are next to it unless
    `urls` (a brace pattern webdataset expands, e.g. "pipe:curl -s http://host/shard-{000000..000031}.tar")
    says where they are."""
    where = manifest_path(path)
    if not where.is_file():
        raise DataError(f"no manifest at {where}: run `foundry prepare-data ... --out {path}` first")
    try:
        manifest = json.loads(where.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"manifest {where} is not valid JSON ({e}): prepare the data again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{where} is not a {FORMAT} manifest: prepare the data with `foundry prepare-data`")
    check_manifest(manifest, where)
    if urls is not None:
        shard_urls = list(wds.shardlists.expand_urls(urls))
        if len(shard_urls) != len(manifest["shards"]):
            raise DataError(f"{urls} names {len(shard_urls)} shards but {where} lists "
                            f"{len(manifest['shards'])}: make them agree")
    else:
        shard_urls = [str(where.parent / s["url"]) for s in manifest["shards"]]
    return Dataset(name=str(path), manifest=manifest, urls=shard_urls, weight=weight)


# A shard a manifest names: a tar file next to it. Never a URL, a path elsewhere or a command (`pipe:`): a
# manifest comes with the data, from whoever wrote the bucket; commands belong in the user's own config.
SHARD_NAME = re.compile(r"[A-Za-z0-9_.-]+\.tar")
TOKENIZER_NAME = re.compile(r"[A-Za-z0-9_.-]+\.json")


def check_manifest(manifest: dict, path: Path) -> None:
    """The manifest is data of the expected shape, and names only shard files next to it; DataError if not."""
    def bad(what: str) -> DataError:
        return DataError(f"manifest {path}: {what}; prepare the data again with `foundry prepare-data`")

    tok = manifest.get("tokenizer")
    if not isinstance(tok, dict) or not all(isinstance(tok.get(k), int) and tok[k] >= 0 for k in ("vocab_size", "eos_id")) \
            or not isinstance(tok.get("fingerprint"), str) or not isinstance(tok.get("file"), str) \
            or not TOKENIZER_NAME.fullmatch(tok["file"]):
        raise bad("its tokenizer entry is not {fingerprint, vocab_size, eos_id, file: a file name}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards or not isinstance(manifest.get("total_tokens"), int):
        raise bad("it has no list of shards or no total_tokens")
    for shard in shards:
        url = shard.get("url") if isinstance(shard, dict) else None
        if not isinstance(url, str) or not SHARD_NAME.fullmatch(url):
            raise bad(f"shard {str(url)[:80]!r} is not the name of a tar file next to the manifest (a manifest may not "
                      f"name commands, URLs or other paths: put those in data.datasets[].urls of your own config)")
        if not all(isinstance(shard.get(k), int) and shard[k] >= 0 for k in ("samples", "tokens")):
            raise bad(f"shard {url} has no sample and token counts")


def check_readers(streams: int, dp_size: int, workers: int) -> None:
    """Every rank's workers must own whole streams."""
    if streams % (dp_size * max(workers, 1)):
        raise DataError(f"data.streams={streams} is not divisible by data-parallel ranks x data.workers = "
                        f"{dp_size} x {max(workers, 1)}: use a multiple of {dp_size * max(workers, 1)}")


def check_compatible(datasets: list[Dataset], streams: int) -> None:
    """All datasets share one tokenizer, and each has a shard for every stream."""
    first = datasets[0]
    for ds in datasets:
        if ds.manifest["tokenizer"]["fingerprint"] != first.manifest["tokenizer"]["fingerprint"]:
            raise DataError(
                f"{ds.name} was tokenized with another tokenizer than {first.name} (fingerprints "
                f"{ds.manifest['tokenizer']['fingerprint']} vs {first.manifest['tokenizer']['fingerprint']}): "
                f"prepare both with the same --tokenizer"
            )
        if len(ds.urls) < streams:
            raise DataError(f"{ds.name} has {len(ds.urls)} shards, fewer than data.streams={streams}: "
                            f"prepare it with a smaller --shard-tokens or lower data.streams")


@dataclass
class Position:
    """Where a stream is in one dataset: the next token to read."""

    epoch: int = 0
    shard: int = 0  # index into this stream's shard list of the epoch
    sample: int = 0  # index into the shard's sample order
    token: int = 0  # offset inside that sample
    skipped_shards: int = 0


class _Cursor:
    """Reads one dataset's tokens for one stream from a Position, advancing it."""

    def __init__(self, ds: Dataset, stream: int, streams: int, seed: int, shuffle: bool, on_error: str,
                 position: Position):
        self.ds, self.stream, self.streams, self.seed = ds, stream, streams, seed
        self.shuffle, self.on_error, self.pos = shuffle, on_error, position
        self.vocab_size = ds.manifest["tokenizer"]["vocab_size"]
        self._loaded: tuple[tuple[int, int], list[np.ndarray], np.ndarray] | None = None

    def _shard_ids(self) -> np.ndarray:
        order = np.random.default_rng([self.seed, self.pos.epoch]).permutation(len(self.ds.urls))
        return order[self.stream :: self.streams]

    def _samples(self) -> tuple[list[np.ndarray], np.ndarray]:
        """The current shard's samples and their reading order, loading the shard if needed."""
        while True:
            shard_ids = self._shard_ids()
            if self.pos.shard >= len(shard_ids):
                self.pos = Position(epoch=self.pos.epoch + 1, skipped_shards=self.pos.skipped_shards)
                continue
            key = (self.pos.epoch, self.pos.shard)
            if self._loaded is not None and self._loaded[0] == key:
                return self._loaded[1], self._loaded[2]
            shard_id = int(shard_ids[self.pos.shard])
            try:
                samples = read_shard(self.ds.urls[shard_id], self.vocab_size)
            except DataError as e:
                if self.on_error == "stop":
                    raise
                self.pos.skipped_shards += 1
                log.warning("skipped shard (%d so far): %s", self.pos.skipped_shards, e)
                self.pos.shard, self.pos.sample, self.pos.token = self.pos.shard + 1, 0, 0
                continue
            order = np.arange(len(samples))
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.pos.epoch, shard_id]).permutation(len(samples))
            self._loaded = (key, samples, order)
            return samples, order

    def take(self, n: int) -> np.ndarray:
        """The next n tokens of this stream, crossing sample, shard and epoch boundaries."""
        pieces, need = [], n
        while need:
            samples, order = self._samples()
            if self.pos.sample >= len(order):
                self.pos.shard, self.pos.sample, self.pos.token = self.pos.shard + 1, 0, 0
                continue
            sample = samples[order[self.pos.sample]]
            piece = sample[self.pos.token : self.pos.token + need]
            pieces.append(piece)
            need -= len(piece)
            self.pos.token += len(piece)
            if self.pos.token >= len(sample):
                self.pos.sample, self.pos.token = self.pos.sample + 1, 0
        return np.concatenate(pieces).astype(np.int64)


def read_shard(url: str, vocab_size: int) -> list[np.ndarray]:
    """All samples of one shard; DataError naming the shard if it is missing, truncated or corrupt."""
    samples = []
    try:
        for sample in wds.WebDataset(url, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                     empty_check=False):
            tokens = np.load(io.BytesIO(sample["tokens.npy"]))
            if tokens.size and int(tokens.max()) >= vocab_size:
                raise DataError(f"shard {url} sample {sample['__key__']} has token id {int(tokens.max())} >= "
                                f"vocabulary size {vocab_size}: the shard does not belong to this manifest")
            samples.append(tokens)
    except DataError:
        raise
    except Exception as e:  # tarfile, IO and pipe errors surface as many types
        detail = str(e.args[0]).splitlines()[0] if e.args else ""
        raise DataError(f"cannot read shard {url}: {type(e).__name__}: {detail}; "
                        f"check that it exists and is a complete tar written by prepare-data") from None
    if not samples:
        raise DataError(f"shard {url} holds no samples: prepare the data again")
    return samples


@dataclass
class StreamState:
    windows: int = 0
    positions: dict[str, Position] = field(default_factory=dict)
    taken: dict[str, int] = field(default_factory=dict)  # windows drawn from each dataset


def block_windows(seq_len: int) -> int:
    """Windows per block: streams are produced, shipped from workers and resumed in blocks of
    about BLOCK_TOKENS tokens, so per-window Python work and inter-process messages stay rare."""
    return max(1, BLOCK_TOKENS // (seq_len + 1))


def _choices(seed: int, stream: int, first: int, count: int, cumulative: np.ndarray) -> np.ndarray:
    """The dataset of windows first .. first+count-1 of a stream: a pure function of the window index."""
    blocks = range(first // MIX_BLOCK, (first + count - 1) // MIX_BLOCK + 1)
    draws = np.concatenate([np.random.default_rng([seed, 1_000_003, stream, b]).random(MIX_BLOCK) for b in blocks])
    offset = first - blocks[0] * MIX_BLOCK
    return np.searchsorted(cumulative, draws[offset : offset + count], side="right").clip(max=len(cumulative) - 1)


def stream_blocks(datasets: list[Dataset], stream: int, streams: int, seed: int, seq_len: int, shuffle: bool,
                  on_error: str, state: StreamState) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:
    """Endless blocks of one stream: windows (block, seq_len + 1) int32, the dataset index of each
    window, and the stream's state at the start of the block (resume = regenerate, skip)."""
    cursors = [
        _Cursor(ds, stream, streams, seed, shuffle, on_error, state.positions.setdefault(ds.name, Position()))
        for ds in datasets
    ]
    weights = np.array([ds.weight for ds in datasets], dtype=np.float64)
    cumulative = np.cumsum(weights / weights.sum())
    block, width = block_windows(seq_len), seq_len + 1
    while True:
        start = _state_to_dict(state)
        choices = _choices(seed, stream, state.windows, block, cumulative)
        windows = np.empty((block, width), dtype=np.int32)
        # A dataset's windows are consecutive reads of its cursor, so taking them together is the same
        # as taking them one by one in the drawn order.
        for d in np.unique(choices):
            rows = np.flatnonzero(choices == d)
            windows[rows] = cursors[d].take(len(rows) * width).reshape(len(rows), width)
            name = datasets[d].name
            state.positions[name] = cursors[d].pos
            state.taken[name] = state.taken.get(name, 0) + len(rows)
        state.windows += block
        yield windows, choices, start


class _Blocks(IterableDataset):
    """Blocks of some streams, for DataLoader workers: worker w of W produces streams[w::W] in turn."""

    def __init__(self, datasets: list[Dataset], streams: list[int], num_streams: int, seed: int, seq_len: int,
                 shuffle: bool, on_error: str, starts: dict[int, dict]):
        self.datasets, self.streams, self.num_streams = datasets, streams, num_streams
        self.seed, self.seq_len, self.shuffle, self.on_error, self.starts = seed, seq_len, shuffle, on_error, starts

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = self.streams[worker::workers]
        iters = [
            stream_blocks(self.datasets, s, self.num_streams, self.seed, self.seq_len, self.shuffle, self.on_error,
                          _state_from_dict(self.starts[s]))
            for s in mine
        ]
        while True:
            for s, it in zip(mine, iters):
                windows, choices, start = next(it)
                yield s, torch.from_numpy(windows), choices, start


@dataclass
class _Current:
    """The block of a stream the training loop is reading, and how far."""

    windows: torch.Tensor
    choices: np.ndarray
    start: dict
    consumed: int


def _ignore_stop_signals(worker_id: int) -> None:
    # SLURM and Ctrl-C signal every process of a job: a loader worker must outlive them, so that the training
    # process can finish its step and save. The training process stops its workers itself (ShardLoader.close),
    # and a worker whose training process died exits on its own (DataLoader's parent watchdog).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class ShardLoader:
    """This data-parallel rank's micro-batches (micro_batch, seq_len + 1) int64 from token shards."""

    def __init__(self, datasets: list[Dataset], *, seq_len: int, micro_batch: int, seed: int, streams: int,
                 workers: int, dp_rank: int, dp_size: int, shuffle: bool = True, on_error: str = "stop",
                 state: dict | None = None):
        check_readers(streams, dp_size, workers)
        check_compatible(datasets, streams)
        if state is not None and (state["streams"], state["block"]) != (streams, block_windows(seq_len)):
            raise DataError(f"the checkpoint's data position has {state['streams']} streams of "
                            f"{state['block']}-window blocks; this run has data.streams={streams} and data.seq_len="
                            f"{seq_len}: keep both as they were to resume")
        self.datasets = datasets
        self.streams = list(range(dp_rank, streams, dp_size))
        self.micro_batch, self.num_streams, self.block = micro_batch, streams, block_windows(seq_len)
        saved = {int(k): v for k, v in (state or {}).get("positions", {}).items()}
        fresh = {"start": _state_to_dict(StreamState()), "consumed": 0}
        self.resume_at = {s: saved.get(s, fresh) for s in self.streams}
        self.current: dict[int, _Current | None] = {s: None for s in self.streams}
        blocks = _Blocks(datasets, self.streams, streams, seed, seq_len, shuffle, on_error,
                         {s: p["start"] for s, p in self.resume_at.items()})
        self.loader = DataLoader(blocks, batch_size=None, num_workers=workers,
                                 prefetch_factor=4 if workers else None, persistent_workers=False,
                                 worker_init_fn=_ignore_stop_signals)
        self._blocks: Iterator | None = None

    def close(self) -> None:
        """Stop the loader workers. Call it on every way out of training: the workers ignore SIGTERM, so
        Python's exit-time terminate() of leftover workers would wait on them for ever."""
        if self._blocks is not None and hasattr(self._blocks, "_shutdown_workers"):
            self._blocks._shutdown_workers()  # what DataLoader's iterator runs when it is collected

    def __iter__(self) -> Iterator[torch.Tensor]:
        blocks = self._blocks = iter(self.loader)
        pending: dict[int, list] = {s: [] for s in self.streams}
        order, i = self.streams, 0
        while True:
            rows = []
            for _ in range(self.micro_batch):
                s = order[i % len(order)]
                i += 1
                cur = self.current[s]
                if cur is None or cur.consumed == len(cur.windows):
                    while not pending[s]:
                        stream, windows, choices, start = next(blocks)
                        pending[stream].append((windows, choices, start))
                    windows, choices, start = pending[s].pop(0)
                    skip = self.resume_at[s]["consumed"] if cur is None else 0
                    cur = self.current[s] = _Current(windows, choices, start, skip)
                rows.append(cur.windows[cur.consumed])
                cur.consumed += 1
            yield torch.stack(rows).long()

    def state_dict(self) -> dict:
        """This rank's streams' positions (merge all ranks' with `merge_states` for a checkpoint)."""
        positions = {}
        for s in self.streams:
            cur = self.current[s]
            positions[s] = self.resume_at[s] if cur is None else {"start": cur.start, "consumed": cur.consumed,
                                                                     "choices": cur.choices[: cur.consumed].tolist()}
        return {"streams": self.num_streams, "block": self.block, "datasets": [d.name for d in self.datasets],
                "positions": positions}


def merge_states(states: list[dict]) -> dict:
    """The data position of the whole run from each data-parallel rank's `state_dict()`."""
    merged = {**states[0], "positions": {}}
    for s in states:
        merged["positions"].update({int(k): v for k, v in s["positions"].items()})
    return merged


def windows_taken(state: dict) -> dict[str, int]:
    """Windows drawn from each dataset so far, over all streams: the realised mixture."""
    total: dict[str, int] = {}
    for p in state["positions"].values():
        for name, n in p["start"]["taken"].items():
            total[name] = total.get(name, 0) + n
        for d in p.get("choices", []):
            name = state["datasets"][d]
            total[name] = total.get(name, 0) + 1
    return total


def skipped_shards(state: dict) -> int:
    return sum(pos["skipped_shards"] for p in state["positions"].values() for pos in p["start"]["positions"].values())


def _state_to_dict(state: StreamState) -> dict:
    return {"windows": state.windows, "positions": {k: asdict(v) for k, v in state.positions.items()},
            "taken": dict(state.taken)}


def _state_from_dict(d: dict) -> StreamState:
    return StreamState(windows=d["windows"], positions={k: Position(**v) for k, v in d["positions"].items()},
                       taken=dict(d["taken"]))
