"""Every kernel path against the plain reference: forward and backward, fp32 on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from foundry.pretrain import kernels
from foundry.pretrain.config import ConfigError, KernelConfig
from foundry.pretrain.model import Llama, ModelOptions, TransformerBlock, rope_cos_sin, rope_frequencies
from tests.conftest import REPO, data_args, read_metrics, torchrun


def _grads(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


def test_chunked_output_layer_and_loss_match_the_whole_logits():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 37, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (2, 37), generator=g)
    whole = kernels.cross_entropy(hidden @ weight.t(), targets)
    chunked = kernels.head_cross_entropy(hidden, weight, targets, chunk=16)  # 74 tokens: chunks of 16, 16, ..., 10
    assert torch.allclose(chunked, whole, rtol=1e-6, atol=0)
    for a, b in zip(_grads(chunked, hidden, weight), _grads(whole, hidden, weight)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_two_models_in_one_process_each_compute_the_loss_their_own_way(tiny, monkeypatch):
    """One model built with the chunked loss, one without, used in turns: each keeps its path, and the two
    agree with the loss of the whole logits."""
    import foundry.pretrain.model as model_module

    chunked_calls = []
    head_cross_entropy = model_module.head_cross_entropy
    monkeypatch.setattr(model_module, "head_cross_entropy",
                        lambda *args: chunked_calls.append(args[-1]) or head_cross_entropy(*args))
    torch.manual_seed(0)
    whole = Llama(tiny)
    torch.manual_seed(0)
    chunked = Llama(tiny, ModelOptions(loss_chunk=20))
    tokens = torch.randint(0, tiny.vocab_size, (2, 33))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    reference = kernels.cross_entropy(whole(inputs), targets)
    losses = {}
    for name, model in (("chunked", chunked), ("whole", whole), ("chunked again", chunked)):
        losses[name] = model(inputs, targets)
    assert chunked_calls == [20, 20]  # the chunked model twice, the whole one never
    assert torch.equal(losses["whole"], reference)
    assert torch.allclose(losses["chunked"], reference, rtol=1e-6, atol=0)
    for a, b in zip(_grads(losses["chunked"], *chunked.parameters()), _grads(reference, *whole.parameters())):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_rms_norm_matches_the_textbook_formula():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 32, generator=g, requires_grad=True)
    w = torch.randn(32, generator=g, requires_grad=True)
    ours = kernels.rms_norm(x, w, 1e-5)
    textbook = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    assert torch.allclose(ours, textbook, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(ours.square().sum(), x, w), _grads(textbook.square().sum(), x, w)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_a_compiled_block_matches_the_eager_block(tiny):
    torch.manual_seed(0)
    block = TransformerBlock(tiny)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    cos, sin = rope_cos_sin(rope_frequencies(tiny.hidden_size // tiny.num_heads, tiny), 16)
    x = torch.randn(2, 16, tiny.hidden_size, requires_grad=True)
    eager = block(x, cos, sin)
    eager_grads = _grads(eager.square().sum(), x, *block.parameters())
    block.compile()
    compiled = block(x, cos, sin)
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(compiled.square().sum(), x, *block.parameters()), eager_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


class _Gains(torch.nn.Module):
    """A matrix (weight-decayed) and a vector (not): the two parameter groups the trainer gives AdamW."""

    def __init__(self, matrix: torch.Tensor, vector: torch.Tensor):
        super().__init__()
        self.matrix, self.vector = torch.nn.Parameter(matrix.clone()), torch.nn.Parameter(vector.clone())


def _engine_steps(workdir: str) -> None:
    """In a fresh process (it joins a process group of one): the AdamW the trainer builds for this machine
    (kernels.optimizer_params, rendered by pretrain/engine.py, on DeepSpeed's engine) takes the saved
    gradients; saves the parameters after each step and the learning rate each step used."""
    from foundry.pretrain import engine as ds_engine
    from foundry.pretrain.config import ParallelConfig, TrainConfig

    case = torch.load(Path(workdir) / "case.pt")
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    ds_engine.init_distributed(device)
    path, params = kernels.optimizer_params(KernelConfig(), device)
    train = TrainConfig(global_batch_size=1, micro_batch_size=1, max_steps=len(case["grads"]), warmup_steps=2,
                        lr=1e-2, grad_clip=0.0, precision="fp32")
    config = ds_engine.deepspeed_config(train, ParallelConfig(), 1, "fp32", params)
    engine = ds_engine.initialize(_Gains(case["matrix"], case["vector"]).to(device), config)
    lrs, after = [], []
    for matrix_grad, vector_grad in case["grads"]:
        lrs.append(engine.get_lr()[0])  # the rate the coming optimizer step uses
        m = engine.module
        engine.backward((m.matrix * matrix_grad.to(device)).sum() + (m.vector * vector_grad.to(device)).sum())
        engine.step()
        after.append({name: p.detach().cpu().clone() for name, p in m.named_parameters()})
    torch.save({"path": path, "lrs": lrs, "after": after}, Path(workdir) / "result.pt")


def _reference_adamw(p: torch.Tensor, grads: list[torch.Tensor], lrs: list[float], betas: tuple[float, float],
                     eps: float, weight_decay: float) -> list[torch.Tensor]:
    """AdamW (Loshchilov & Hutter 2019, Algorithm 2 as torch.optim.AdamW documents it), written out in fp64."""
    p, m, v, out = p.double(), torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64), []
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g.double()
        p = p * (1 - lr * weight_decay)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        p = p - lr * m_hat / (v_hat.sqrt() + eps)
        out.append(p)
    return out


def test_the_optimizer_the_trainer_builds_takes_adamw_steps(tmp_path):
    """On CPU the trainer's AdamW is torch's foreach one; on a GPU, torch's fused one (kernels.optimizer_params):
    either, through the DeepSpeed engine, must take the steps of AdamW written out by hand."""
    from foundry.pretrain.config import TrainConfig

    g = torch.Generator().manual_seed(2)
    matrix, vector = torch.randn(64, 16, generator=g), torch.randn(16, generator=g)
    grads = [(torch.randn(64, 16, generator=g), torch.randn(16, generator=g)) for _ in range(6)]
    torch.save({"matrix": matrix, "vector": vector, "grads": grads}, tmp_path / "case.pt")
    proc = subprocess.run([sys.executable, "-c", "import sys; from tests.test_kernels import _engine_steps; "
                           "_engine_steps(sys.argv[1])", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt")
    expected_path = "torch AdamW, fused" if torch.cuda.is_available() else "torch AdamW, foreach"
    assert result["path"] == expected_path
    assert result["lrs"][0] == 0.0 and max(result["lrs"]) > 0  # warm-up from 0: the later steps move the weights
    defaults = TrainConfig()
    for name, start, decay in (("matrix", matrix, defaults.weight_decay), ("vector", vector, 0.0)):
        expected = _reference_adamw(start, [grad[name == "vector"] for grad in grads], result["lrs"],
                                    tuple(defaults.betas), defaults.eps, decay)
        for step, (after, want) in enumerate(zip(result["after"], expected), start=1):
            torch.testing.assert_close(after[name].double(), want, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name} after step {step}: {m}")
        assert not torch.allclose(result["after"][-1][name], start)  # it moved: equal weights mean something


@pytest.mark.parametrize("field, value, installed, error", [
    ("attention", "flash-attn", kernels.flash_attn_func is not None,
     "kernels.attention=flash-attn but flash_attn is not installed"),
    ("rmsnorm", "apex", kernels.fused_rms_norm_affine is not None, "kernels.rmsnorm=apex but NVIDIA apex is not installed"),
])
def test_a_kernel_asked_for_by_name_must_be_installed(field, value, installed, error):
    """Refused where it is missing (a CPU machine), accepted where it is installed (a GPU machine with it)."""
    if installed:
        kernels.check(KernelConfig(**{field: value}))
    else:
        with pytest.raises(ConfigError, match=error):
            kernels.check(KernelConfig(**{field: value}))


def test_optimizer_paths():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert kernels.optimizer_params(KernelConfig(), cpu) == ("torch AdamW, foreach", {"torch_adam": True})
    assert kernels.optimizer_params(KernelConfig(), cuda)[1] == {"torch_adam": True, "fused": True}
    assert kernels.optimizer_params(KernelConfig(optimizer="deepspeed-fused"), cuda)[1] == {"torch_adam": False}


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory, stdlib_shards) -> Path:
    """Shards of short documents (the lines of a few stdlib modules, one per document), with the stdlib
    shards' tokenizer: every 64-token window holds several documents."""
    import json
    import sysconfig

    from foundry.data.prepare import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("short_documents")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines = [line.strip() for name in ("json/decoder.py", "json/encoder.py", "logging/handlers.py")
             for line in (stdlib / name).read_text().splitlines() if len(line.strip()) > 8]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    prepare([str(root / "docs.jsonl")], PrepareOptions(out=root / "shards", tokenizer=str(stdlib_shards / "tokenizer.json"),
                                                      sample_tokens=512, shard_tokens=4000, workers=1))
    return root / "shards"


def test_training_with_the_chunked_loss_and_with_document_masking(tmp_path, short_documents):
    common = ["configs/models/tiny.yaml", "configs/quickstart.yaml", *data_args(short_documents), "train.max_steps=4",
              "train.warmup_steps=1", "train.global_batch_size=4", "train.micro_batch_size=4", "data.seq_len=64",
              "tracking.log_interval=1", "data.workers=0"]
    runs = {
        "whole": (1, []), "chunked": (1, ["kernels.loss_chunk_tokens=50"]),
        "documents": (1, ["data.document_mask=true"]), "documents-tp2": (2, ["data.document_mask=true",
                                                                            "parallel.tensor=2"]),
    }
    logs, metrics = {}, {}
    for name, (nproc, extra) in runs.items():
        out = torchrun(nproc, [*common, *extra, f"train.run_dir={tmp_path / name}"])
        logs[name], metrics[name] = out.stderr + out.stdout, read_metrics(tmp_path / name)
    assert "loss chunked, 50 tokens" in logs["chunked"] and "with document masking" in logs["documents"]
    for a, b in zip(metrics["whole"], metrics["chunked"]):  # the same maths, in pieces
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4
    assert abs(metrics["whole"][0]["loss"] - metrics["documents"][0]["loss"]) > 1e-4  # the mask changes the maths
    for a, b in zip(metrics["documents"], metrics["documents-tp2"]):  # and tensor parallelism keeps it
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4


def test_document_masking_gives_each_packed_document_the_logits_it_has_alone(tiny):
    """A model with document masking and one without, from the same seed, side by side in one process."""
    end = 7
    torch.manual_seed(0)
    plain = Llama(tiny)
    torch.manual_seed(0)
    masking = Llama(tiny, ModelOptions(document_end=end))
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(10, tiny.vocab_size, (n,), generator=g) for n in (9, 13, 6)]
    docs = [torch.cat([d, torch.tensor([end])]) for d in docs]  # each document ends with the end token
    packed = torch.cat(docs)[None]  # one window of 31 tokens
    alone = [plain(d[None]) for d in docs]
    masked = masking(packed)
    offset = 0
    for d, logits in zip(docs, alone):
        assert torch.allclose(masked[:, offset:offset + len(d)], logits, rtol=1e-5, atol=1e-5)
        offset += len(d)
    # Without the mask, later documents see earlier ones: the test can fail.
    assert not torch.allclose(plain(packed)[:, 10:24], alone[1], rtol=1e-3, atol=1e-3)


def test_document_positions_restart_after_each_end_token():
    from foundry.pretrain.model import document_positions

    tokens = torch.tensor([[5, 1, 0, 4, 4, 0, 3], [0, 2, 2, 2, 0, 0, 9]])
    documents, positions = document_positions(tokens, end=0)
    assert documents.tolist() == [[0, 0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 2, 3]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 0], [0, 0, 1, 2, 3, 0, 0]]
