"""Token shards: prepared as plain tars, streamed once per epoch across ranks and workers,
resumed to the exact token, mixed by weight, and refused with a clear message when bad."""

from __future__ import annotations

import gzip
import json
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from foundry.data.prepare import PrepareOptions, prepare
from foundry.data.stream import (
    ShardLoader,
    block_windows,
    merge_states,
    open_dataset,
    read_shard,
    skipped_shards,
    windows_taken,
)
from foundry.data.tokenizer import DataError

SEQ = 31


def _write_corpus(root: Path, seed: int, n: int = 40, words: str = "alpha beta gamma delta epsilon zeta") -> Path:
    rng = np.random.default_rng(seed)
    vocab = words.split()
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(vocab, size=int(rng.integers(50, 400)))))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stream")
    prepare([str(_write_corpus(root / "raw", 0))],
            PrepareOptions(out=root / "shards", vocab_size=300, sample_tokens=64, shard_tokens=500, workers=2))
    return root / "shards"


def _loader(paths, dp_rank=0, dp_size=1, workers=0, state=None, weights=None, micro=1, streams=4):
    datasets = [open_dataset(str(p), weight=w) for p, w in zip(paths, weights or [1.0] * len(paths))]
    return ShardLoader(datasets, seq_len=SEQ, micro_batch=micro, seed=7, streams=streams, workers=workers,
                       dp_rank=dp_rank, dp_size=dp_size, state=state)


def _all_tokens(shard_dir: Path) -> list[int]:
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    return [int(t) for s in manifest["shards"] for sample in read_shard(str(shard_dir / s["url"]), 10**6) for t in sample]


def test_shards_are_plain_tars_that_webdataset_reads(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    first = shards / manifest["shards"][0]["url"]
    listing = subprocess.run(["tar", "tf", str(first)], capture_output=True, text=True, check=True).stdout.split()
    assert listing and all(name.endswith(".tokens.npy") for name in listing)
    samples = list(wds.WebDataset(str(first), shardshuffle=False, empty_check=False).decode())
    assert len(samples) == manifest["shards"][0]["samples"]
    assert samples[0]["tokens.npy"].dtype == np.uint16  # the smallest dtype for a 300-token vocabulary
    assert sum(len(s["tokens.npy"]) for s in samples) == manifest["shards"][0]["tokens"]


def test_every_token_once_per_epoch_across_2_ranks_x_2_workers(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    per_stream_tokens = {}
    order = np.random.default_rng([7, 0]).permutation(len(manifest["shards"]))
    for s in range(4):
        per_stream_tokens[s] = sum(manifest["shards"][i]["tokens"] for i in order[s::4])
    seen = Counter()
    for rank in range(2):
        it = iter(_loader([shards], dp_rank=rank, dp_size=2, workers=2))
        local_streams = [rank, rank + 2]
        tokens = {s: [] for s in local_streams}
        # window i of this rank comes from stream local_streams[i % 2]
        for i in range(2 * max(per_stream_tokens[s] for s in local_streams) // (SEQ + 1) + 4):
            tokens[local_streams[i % 2]] += next(it)[0].tolist()
        for s in local_streams:
            seen.update(tokens[s][: per_stream_tokens[s]])
    assert seen == Counter(_all_tokens(shards))


def test_the_layout_does_not_change_the_windows(shards):
    single = iter(_loader([shards]))
    reference = [next(single)[0] for _ in range(24)]
    ranks = [iter(_loader([shards], dp_rank=r, dp_size=2, workers=2)) for r in range(2)]
    for i in range(12):
        for r in range(2):  # global window j = r + 2 i
            assert np.array_equal(next(ranks[r])[0], reference[r + 2 * i])


@pytest.mark.parametrize("dp_after", [2, 1])
def test_resume_continues_exactly(shards, dp_after):
    def run(dp: int, n: int, state=None):
        loaders = [_loader([shards], dp_rank=r, dp_size=dp, workers=1, state=state, micro=2) for r in range(dp)]
        iters = [iter(l) for l in loaders]
        batches = [[next(it) for _ in range(n)] for it in iters]
        return batches, merge_states([l.state_dict() for l in loaders])

    straight, _ = run(2, 10)
    first, state = run(2, 4)
    state = json.loads(json.dumps(state))  # it travels through a checkpoint as plain data
    resumed, _ = run(dp_after, 6 * 2 // dp_after, state)
    for r in range(2):
        assert all(np.array_equal(a, b) for a, b in zip(first[r], straight[r][:4]))
    if dp_after == 2:
        for r in range(2):
            assert all(np.array_equal(a, b) for a, b in zip(resumed[r], straight[r][4:]))
    else:  # one rank now reads every stream: its windows interleave the two ranks' windows
        windows = [w for b in resumed[0] for w in b]
        expected = [w for i in range(4, 10) for pair in zip(straight[0][i], straight[1][i]) for w in pair]
        assert all(np.array_equal(a, b) for a, b in zip(windows, expected))


def test_mixture_hits_its_weights(tmp_path, shards):
    other = tmp_path / "other"
    prepare([str(_write_corpus(tmp_path / "raw2", 1, words="omega psi chi phi"))],
            PrepareOptions(out=other, tokenizer=str(shards / "tokenizer.json"), sample_tokens=64, shard_tokens=500,
                           workers=1))
    loader = _loader([shards, other], weights=[0.7, 0.3])
    it = iter(loader)
    n = 3000
    windows = [next(it)[0] for _ in range(n)]
    taken = windows_taken(loader.state_dict())
    assert sum(taken.values()) == n
    # Binomial: 3 standard deviations of the share at n=3000 is 0.025.
    assert abs(taken[str(shards)] / n - 0.7) < 0.025, taken
    # And the windows really differ by source: the second corpus's words are rare in the first tokenizer.
    assert len({tuple(w.tolist()) for w in windows}) > n // 2


def test_manifest_from_another_tokenizer_is_refused(tmp_path, shards):
    other = tmp_path / "other"
    prepare([str(_write_corpus(tmp_path / "raw3", 2))],
            PrepareOptions(out=other, vocab_size=280, sample_tokens=64, shard_tokens=500, workers=1))
    with pytest.raises(DataError, match="another tokenizer"):
        _loader([shards, other])


def _copy(shards: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(shards, dst)
    return dst


def test_truncated_shard_names_the_file(tmp_path, shards):
    bad = _copy(shards, tmp_path / "bad")
    shard = bad / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    with pytest.raises(DataError, match="shard-000000.tar"):
        read_shard(str(shard), 300)


def test_token_id_beyond_the_vocabulary_is_refused(tmp_path, shards):
    bad = _copy(shards, tmp_path / "bad")
    shard = bad / "shard-000001.tar"
    with wds.TarWriter(str(shard)) as w:
        w.write({"__key__": "0", "tokens.npy": np.array([1, 2, 999], dtype=np.uint16)})
    with pytest.raises(DataError, match="token id 999 >= vocabulary size 300"):
        read_shard(str(shard), 300)


def test_missing_shard_url_names_it(tmp_path, shards):
    with pytest.raises(DataError, match="nowhere/shard-000003.tar"):
        read_shard(str(tmp_path / "nowhere" / "shard-000003.tar"), 300)


def test_skip_policy_counts_and_goes_on(tmp_path, shards):
    bad = _copy(shards, tmp_path / "bad")
    (bad / "shard-000002.tar").write_bytes(b"not a tar")
    datasets = [open_dataset(str(bad))]
    loader = ShardLoader(datasets, seq_len=SEQ, micro_batch=1, seed=7, streams=4, workers=0, dp_rank=0, dp_size=1,
                         on_error="skip")
    it = iter(loader)
    for _ in range(4 * block_windows(SEQ) + 4):  # every stream into its second block, which starts with the count
        next(it)
    assert skipped_shards(loader.state_dict()) >= 1
    strict = ShardLoader(datasets, seq_len=SEQ, micro_batch=1, seed=7, streams=4, workers=0, dp_rank=0, dp_size=1)
    with pytest.raises(DataError, match="shard-000002.tar"):
        for _ in zip(range(400), iter(strict)):
            pass


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"  \n", "empty.txt is empty"),
        ("latin1.txt", "caf\xe9".encode("latin-1"), "latin1.txt is not valid UTF-8"),
        ("bad.jsonl", b'{"text": "ok"}\n{"txt": "no"}\n', "bad.jsonl line 2"),
    ],
)
def test_bad_input_files_are_named(tmp_path, shards, name, content, message):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "good.txt").write_text("fine text " * 20)
    (raw / name).write_bytes(content)
    opts = PrepareOptions(out=tmp_path / "out", tokenizer=str(shards / "tokenizer.json"), workers=1)
    with pytest.raises(DataError, match=message):
        prepare([str(raw)], opts)
    opts.on_error = "skip"
    manifest = prepare([str(raw)], opts)
    assert manifest["documents_skipped"] == [str(raw / name)] and manifest["total_tokens"] > 0


def test_compressed_jsonl_inputs(tmp_path, shards):
    raw = tmp_path / "raw"
    raw.mkdir()
    docs = [{"text": f"document number {i} " * 5} for i in range(10)]
    with gzip.open(raw / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    import zstandard

    (raw / "b.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"zstd compressed text " * 10))
    manifest = prepare([str(raw)], PrepareOptions(out=tmp_path / "out", tokenizer=str(shards / "tokenizer.json"),
                                                  workers=1))
    eos = manifest["tokenizer"]["eos_id"]
    tokens = _all_tokens(tmp_path / "out")
    assert tokens.count(eos) == 11  # ten jsonl documents and one text file, each closed by EOS


def test_shards_stream_from_a_pipe_url_with_a_brace_pattern(shards):
    """Remote stores are read through whatever webdataset opens; `pipe:` runs a command per shard."""
    n = len(json.loads((shards / "manifest.json").read_text())["shards"])
    urls = f"pipe:cat {shards}/shard-{{000000..{n - 1:06d}}}.tar"
    local, piped = iter(_loader([shards])), iter(ShardLoader(
        [open_dataset(str(shards), urls=urls)], seq_len=SEQ, micro_batch=1, seed=7, streams=4, workers=0,
        dp_rank=0, dp_size=1))
    for _ in range(50):
        assert np.array_equal(next(local), next(piped))
    with pytest.raises(DataError, match=f"names {n - 1} shards but"):
        open_dataset(str(shards), urls=f"pipe:cat {shards}/shard-{{000000..{n - 2:06d}}}.tar")
