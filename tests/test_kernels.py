"""Every kernel path against the plain reference: forward and backward, fp32 on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from foundry.pretrain import kernels
from foundry.pretrain.config import ConfigError, KernelConfig
from foundry.pretrain.model import Llama, TransformerBlock, rope_cos_sin, rope_frequencies
from tests.conftest import data_args, read_metrics, torchrun


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


def test_the_model_computing_its_own_chunked_loss_matches_loss_of_its_logits(tiny):
    torch.manual_seed(0)
    model = Llama(tiny)
    tokens = torch.randint(0, tiny.vocab_size, (2, 33))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    reference = kernels.cross_entropy(model(inputs), targets)
    ref_grads = _grads(reference, *model.parameters())
    model.loss_chunk = 20
    chunked = model(inputs, targets)
    assert torch.allclose(chunked, reference, rtol=1e-6, atol=0)
    for a, b in zip(_grads(chunked, *model.parameters()), ref_grads):
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


def test_fused_adamw_takes_the_same_steps_as_foreach():
    g = torch.Generator().manual_seed(2)
    start = torch.randn(64, 16, generator=g)
    grads = [torch.randn(64, 16, generator=g) for _ in range(5)]
    results = []
    for fused in (False, True):
        p = torch.nn.Parameter(start.clone())
        opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
        for grad in grads:
            p.grad = grad.clone()
            opt.step()
        results.append(p.detach())
    assert torch.allclose(results[0], results[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("field, value, error", [
    ("attention", "flash-attn", "kernels.attention=flash-attn but flash_attn is not installed"),
    ("rmsnorm", "apex", "kernels.rmsnorm=apex but NVIDIA apex is not installed"),
])
def test_a_kernel_asked_for_by_name_must_be_installed(field, value, error):
    if (kernels.flash_attn_func if field == "attention" else kernels.fused_rms_norm_affine) is not None:
        pytest.fail("this test expects a machine without flash-attn and apex (CPU)")
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
    torch.manual_seed(0)
    model = Llama(tiny)
    end = 7
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(10, tiny.vocab_size, (n,), generator=g) for n in (9, 13, 6)]
    docs = [torch.cat([d, torch.tensor([end])]) for d in docs]  # each document ends with the end token
    packed = torch.cat(docs)[None]  # one window of 31 tokens
    alone = [model(d[None]) for d in docs]
    model.document_end = end
    masked = model(packed)
    offset = 0
    for d, logits in zip(docs, alone):
        assert torch.allclose(masked[:, offset:offset + len(d)], logits, rtol=1e-5, atol=1e-5)
        offset += len(d)
    model.document_end = None  # without the mask, later documents see earlier ones: the test can fail
    assert not torch.allclose(model(packed)[:, 10:24], alone[1], rtol=1e-3, atol=1e-3)


def test_document_positions_restart_after_each_end_token():
    from foundry.pretrain.model import document_positions

    tokens = torch.tensor([[5, 1, 0, 4, 4, 0, 3], [0, 2, 2, 2, 0, 0, 9]])
    documents, positions = document_positions(tokens, end=0)
    assert documents.tolist() == [[0, 0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 2, 3]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 0], [0, 0, 1, 2, 3, 0, 0]]
