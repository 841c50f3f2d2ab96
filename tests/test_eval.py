"""Held-out validation: the same loss under every layout, exactly the configured tokens, no effect on
training; and `foundry generate` on a checkpoint."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from foundry.data.stream import open_dataset
from foundry.pretrain.checkpoint import tag_for, verify
from foundry.pretrain.reshard import full_weights
from foundry.pretrain.config import load_config
from foundry.pretrain.evaluate import eval_windows
from foundry.pretrain.model import Llama
from tests.conftest import REPO, data_args, foundry, read_metrics, torchrun

SEQ, TOKENS = 64, 1344  # 21 windows: under dp 2 one rank has 11, the other 10 and a padding window
SMALL = ["configs/models/tiny.yaml", "configs/quickstart.yaml", "train.global_batch_size=8", "train.micro_batch_size=4",
         "train.warmup_steps=2", f"data.seq_len={SEQ}", "tracking.log_interval=1", "checkpoint.resume=false",
         f"eval.tokens={TOKENS}"]


def _eval_args(val) -> list[str]:
    return [f"eval.datasets=[{val}]"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, stdlib_shards, val_shards):
    """A 6-step single-process run with validation at steps 3 and 6."""
    run_dir = tmp_path_factory.mktemp("eval_run")
    torchrun(1, [*SMALL, *data_args(stdlib_shards), *_eval_args(val_shards), "train.max_steps=6", "eval.interval=3",
                 f"train.run_dir={run_dir}"])
    return run_dir


def _foundry_eval(nproc: int, run_dir, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "foundry.launch.cli", "eval", str(run_dir), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith('{"checkpoint"'))
    return json.loads(line)["sets"][val_name()]


def val_name() -> str:
    return "val_shards0"  # the directory pytest made for the validation set


def test_validation_is_logged_during_training_and_falls(trained):
    records = [json.loads(line) for line in (trained / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    losses = [r["sets"][val_name()]["loss"] for r in records]
    assert losses[1] < losses[0] and all(r["sets"][val_name()]["tokens"] == TOKENS for r in records)


@pytest.mark.parametrize("nproc, layout", [(1, []), (2, ["parallel.tensor=2"]), (2, ["parallel.pipeline=2"]),
                                           (2, [])], ids=["1-1-1", "tp2", "pp2", "dp2"])
def test_a_checkpoint_has_the_same_validation_loss_under_every_layout(trained, nproc, layout):
    during_training = json.loads((trained / "eval.jsonl").read_text().splitlines()[-1])["sets"][val_name()]
    result = _foundry_eval(nproc, trained, layout)
    assert result["tokens"] == TOKENS
    assert abs(result["loss"] - during_training["loss"]) < 1e-5, (result, during_training)


def test_perplexity_is_exp_of_the_mean_token_loss_over_exactly_the_configured_tokens(trained, val_shards):
    cfg = load_config([str(trained / "config.yaml")], [])
    model = Llama(cfg.model)
    tag_dir = trained / "checkpoints" / tag_for(6)
    model.load_state_dict(full_weights(tag_dir, verify(tag_dir, {}), cfg.model.vocab_size, False))
    windows = eval_windows(open_dataset(str(val_shards)), SEQ, TOKENS)
    assert windows.shape == (TOKENS // SEQ, SEQ + 1)
    with torch.no_grad():
        logits = model(windows[:, :-1])
    token_losses = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="none")
    assert token_losses.numel() == TOKENS
    result = json.loads((trained / "eval.jsonl").read_text().splitlines()[-1])["sets"][val_name()]
    assert abs(result["loss"] - token_losses.mean().item()) < 1e-5
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)


def test_evaluation_leaves_the_training_stream_untouched(tmp_path, stdlib_shards, val_shards):
    """Pipeline stages: evaluation runs other shapes through them, which must not disturb training."""
    args = [*SMALL, *data_args(stdlib_shards), "parallel.pipeline=2", "train.max_steps=6"]
    torchrun(2, [*args, f"train.run_dir={tmp_path / 'plain'}"])
    torchrun(2, [*args, *_eval_args(val_shards), "eval.interval=2", f"train.run_dir={tmp_path / 'evaluated'}"])
    assert (tmp_path / "evaluated" / "eval.jsonl").read_text().count("\n") == 3
    plain, evaluated = (read_metrics(tmp_path / d) for d in ("plain", "evaluated"))
    assert [(m["loss"], m["grad_norm"]) for m in plain] == [(m["loss"], m["grad_norm"]) for m in evaluated]


def test_generate_continues_a_prompt_from_a_checkpoint(trained):
    proc = foundry(["generate", str(trained), "--prompt", "def ", "--prompt", "import", "--max-new-tokens", "12"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--- 'def ' ->\ndef " in proc.stdout and "--- 'import' ->\nimport" in proc.stdout
    sampled = foundry(["generate", str(trained), "--prompt", "def ", "--temperature", "0.8", "--top-p", "0.9"])
    assert sampled.returncode == 0, sampled.stderr[-2000:]


def test_bad_eval_settings_fail_with_one_line(stdlib_shards, tmp_path):
    proc = foundry(["train", *SMALL, *data_args(stdlib_shards), "eval.tokens=100", f"train.run_dir={tmp_path}"])
    assert proc.returncode == 2
    error = proc.stderr.strip().splitlines()[-1]
    assert "eval.tokens=100" in error and "multiple of data.seq_len=64" in error and "e.g. eval.tokens=64" in error
    proc = foundry(["generate", str(tmp_path / "nothing"), "--prompt", "x"])
    assert proc.returncode == 2 and "is neither a checkpoint nor a run directory" in proc.stderr


def test_prepare_data_holds_out_whole_files_with_the_same_tokenizer(tmp_path):
    stdlib = __import__("sysconfig").get_paths()["stdlib"] + "/json"
    common = ["prepare-data", stdlib, "--pattern", "*.py", "--vocab-size", "300", "--sample-tokens", "256",
              "--workers", "1", "--on-error", "skip"]
    assert foundry([*common, "--out", str(tmp_path / "all")]).returncode == 0
    split = foundry([*common, "--holdout", "0.3", "--out", str(tmp_path / "split")])
    assert split.returncode == 0, split.stderr[-2000:]
    manifests = {name: json.loads((tmp_path / name / "manifest.json").read_text())
                 for name in ("all", "split", "split/holdout")}
    held, kept = manifests["split/holdout"]["total_tokens"], manifests["split"]["total_tokens"]
    assert held > 0 and kept > 0 and held + kept == manifests["all"]["total_tokens"]  # every file in exactly one
    assert len({m["tokenizer"]["fingerprint"] for m in manifests.values()}) == 1
