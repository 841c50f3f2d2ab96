"""Hugging Face interop: export gives transformers' logits, import round-trips, and imported weights
start a run identically under any layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers  # a test dependency (pyproject [test]): missing, the module fails rather than skips
from safetensors.torch import load_file

from foundry.launch.cli import main
from foundry.pretrain.config import ModelConfig, RunConfig, load_model_config, to_yaml
from foundry.pretrain.model import Llama
from tests.conftest import data_args, read_metrics, torchrun

# Grouped-query attention, untied embeddings, and a vocabulary (301) not divisible by tp=2.
CFG = ModelConfig(vocab_size=301, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                  max_seq_len=64)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run directory as training leaves it with checkpoint.save_consolidated=true."""
    torch.manual_seed(0)
    model = Llama(CFG)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    run = tmp_path / "run"
    run.mkdir()
    torch.save(model.state_dict(), run / "model.pt")
    (run / "config.yaml").write_text(to_yaml(RunConfig(model=CFG)))
    return run


def test_export_loads_in_transformers_with_the_same_logits(run_dir, tmp_path):
    out = tmp_path / "hf"
    assert main(["convert", "export", str(run_dir), "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    hf = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ours = Llama(CFG).eval()
    ours.load_state_dict(torch.load(run_dir / "model.pt"))
    tokens = torch.randint(0, CFG.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)


def test_import_then_export_round_trips_every_tensor(run_dir, tmp_path):
    first, again = tmp_path / "hf1", tmp_path / "hf2"
    assert main(["convert", "export", str(run_dir), "--out", str(first)]) == 0
    assert main(["convert", "import", str(first), "--out", str(tmp_path / "model.yaml")]) == 0
    assert load_model_config(str(tmp_path / "model.yaml")) == CFG
    from foundry.pretrain.convert import load_hf, save_hf

    cfg, state = load_hf(first)
    save_hf(state, cfg, again)
    a, b = load_file(str(first / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_imported_weights_start_every_layout_alike(tmp_path, stdlib_shards):
    torch.manual_seed(1)
    tiny = load_model_config("configs/models/tiny.yaml")
    hf_dir = tmp_path / "hf"
    from foundry.pretrain.convert import save_hf

    save_hf(Llama(tiny).state_dict(), tiny, hf_dir)
    common = ["configs/models/tiny.yaml", "configs/quickstart.yaml", *data_args(stdlib_shards), "train.max_steps=2",
              "train.warmup_steps=1", "train.global_batch_size=8", "train.micro_batch_size=4", "data.seq_len=64",
              "tracking.log_interval=1", "train.seed=99"]
    torchrun(1, [*common, f"checkpoint.init_from={hf_dir}", f"train.run_dir={tmp_path / 'single'}"])
    torchrun(2, [*common, f"checkpoint.init_from={hf_dir}", "parallel.tensor=2", f"train.run_dir={tmp_path / 'tp2'}"])
    single, tp2 = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "tp2")
    assert tp2[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-5)
    # Without init_from, seed 99 gives other weights, hence another first loss.
    torchrun(1, [*common, f"train.run_dir={tmp_path / 'fresh'}"])
    assert read_metrics(tmp_path / "fresh")[0]["loss"] != pytest.approx(single[0]["loss"], rel=1e-5)


def test_init_from_with_another_architecture_is_refused(tmp_path, stdlib_shards, capsys):
    from foundry.pretrain.convert import save_hf

    save_hf(Llama(CFG).state_dict(), CFG, tmp_path / "hf")
    rc = main(["train", "configs/models/tiny.yaml", "configs/quickstart.yaml", *data_args(stdlib_shards),
               f"checkpoint.init_from={tmp_path / 'hf'}"])
    assert rc == 2
    assert "model.vocab_size=512 but" in capsys.readouterr().err


def test_export_from_a_sharded_checkpoint_equals_the_gathered_model(tmp_path, stdlib_shards):
    """No model.pt needed: export joins the newest checkpoint's tensor-parallel shards offline, dropping
    the padding of a vocabulary (513) that tp=2 does not divide."""
    run = tmp_path / "run"
    torchrun(2, ["configs/models/tiny.yaml", "configs/quickstart.yaml", *data_args(stdlib_shards), "model.vocab_size=513",
                 "train.max_steps=3", "train.warmup_steps=1", "train.global_batch_size=8", "train.micro_batch_size=4",
                 "data.seq_len=64", "parallel.tensor=2", "checkpoint.save_consolidated=true", f"train.run_dir={run}"])
    gathered = torch.load(run / "model.pt")
    (run / "model.pt").rename(tmp_path / "gathered.pt")
    assert main(["convert", "export", str(run), "--out", str(tmp_path / "hf")]) == 0
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert exported.keys() == gathered.keys()
    assert all(torch.equal(exported[k], gathered[k]) for k in gathered)
    assert exported["lm_head.weight"].shape[0] == 513
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
