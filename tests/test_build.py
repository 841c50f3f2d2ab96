"""No rank ever holds the whole model: the model is built on the meta device, sliced for its rank, and only the
rank's slices get memory and values, generated from the seed and each parameter's name, or read slice by slice
from a Hugging Face checkpoint. Memory is measured in a fresh process that runs as one rank of a larger world on
torch's fake process group (benchmarks/build_memory.py, the trainer's own build)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from foundry.parallel.tensor import Shard
from foundry.pretrain.config import ModelConfig
from foundry.pretrain.convert import save_hf
from foundry.pretrain.model import Llama
from tests.conftest import REPO

MB = 2**20


@pytest.mark.parametrize("dim,parts,rows", [(0, 2, 10), (1, 4, 12), (0, 4, 10), (0, 8, 10)])
def test_a_shard_read_from_a_file_equals_the_shard_cut_from_the_whole(tmp_path, dim, parts, rows):
    """A vocabulary of 10 rows on 4 or 8 ranks is padded with zero rows; the last parts are padding only."""
    full = torch.randn(rows, 12)
    save_file({"w": full}, str(tmp_path / "w.safetensors"))
    shape = tuple(full.shape)
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        pieces = [Shard(shape, dim, rank, parts).read(f.get_slice("w")) for rank in range(parts)]
    for rank, piece in enumerate(pieces):
        assert torch.equal(piece, Shard(shape, dim, rank, parts).cut(full))
        assert piece.shape == Shard(shape, dim, rank, parts).shape
    padded = torch.nn.functional.pad(full, (0, 0, 0, -rows % parts)) if dim == 0 else full
    assert torch.equal(torch.cat(pieces, dim), padded)


# Large enough that the slices, the largest parameter and the whole model (512 MB in fp32) differ by far more
# than the noise of a process's resident memory; rank 0 of tp 2 x pp 2 holds half the embedding and half of
# blocks 0-1 (about 130 MB).
MEDIUM = ModelConfig(vocab_size=32000, hidden_size=1024, num_layers=4, num_heads=8, num_kv_heads=4,
                     ffn_hidden_size=4096, max_seq_len=256)
OVERRIDES = [f"model.{k}={v}" for k, v in MEDIUM.__dict__.items() if k != "rope_scaling"] + [
    "parallel.tensor=2", "parallel.pipeline=2", "launch.procs_per_node=4", "train.global_batch_size=4",
    "train.micro_batch_size=1", "data.seq_len=256", "data.streams=4"]


def _build_rank(rank: int, extra: list[str]) -> dict:
    out = subprocess.run([sys.executable, "benchmarks/build_memory.py", "configs/models/tiny.yaml",
                          "configs/quickstart.yaml", *OVERRIDES, *extra, "--rank", str(rank), "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("medium_hf")
    save_hf(Llama(MEDIUM, seed=5).state_dict(), MEDIUM, path)
    return path


@pytest.mark.parametrize("source", ["seed", "init_from"])
def test_building_a_rank_peaks_at_its_slice_plus_one_parameter_not_the_model(source, hf_dir):
    got = _build_rank(0, [f"checkpoint.init_from={hf_dir}"] if source == "init_from" else [])
    assert (got["tp"], got["pp"]) == (0, 0)
    whole, held, largest = got["whole_model_bytes"], got["held_bytes"], got["largest_full_parameter_bytes"]
    assert held < whole / 3  # half the first stage's half of the model, and the embedding's half
    # The slices, one full parameter at a time and its cut copy; 64 MB for the allocator and the like.
    assert got["peak_added_bytes"] < held + largest + 64 * MB, got
    assert got["peak_added_bytes"] < whole * 0.75, got  # the old build held the whole model, then sliced it


def test_init_from_gives_each_rank_the_slices_of_the_stored_model(hf_dir, tmp_path):
    """Every rank of tp 2 x pp 2 reads its own parts; joined again they are the stored model."""
    expected = Llama(MEDIUM, seed=5).state_dict()
    script = f"""
import sys, torch
from benchmarks.build_memory import build_rank
model = build_rank(["configs/models/tiny.yaml", "configs/quickstart.yaml"], {OVERRIDES + [f"checkpoint.init_from={hf_dir}"]!r}, int(sys.argv[1]))
torch.save({{n: p.detach().clone() for n, p in model.named_parameters() if not p.is_meta}}, sys.argv[2])
"""
    parts = {}
    for rank in range(4):
        out = tmp_path / f"rank{rank}.pt"
        proc = subprocess.run([sys.executable, "-c", script, str(rank), str(out)], cwd=REPO, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        parts[rank] = torch.load(out)
    # Ranks 0, 1 are stage 0 (tp ranks 0, 1); 2, 3 stage 1.
    for name, value in expected.items():
        holders = [r for r in range(4) if name in parts[r]]
        assert holders, name
        pieces = [parts[r][name] for r in holders[:2]]
        if pieces[0].shape == value.shape:
            assert all(torch.equal(p, value) for p in pieces), name  # replicated across tp
        else:
            dim = 0 if pieces[0].shape[1:] == value.shape[1:] else 1
            assert torch.equal(torch.cat(pieces, dim).narrow(dim, 0, value.shape[dim]), value), name
