"""Bytes each rank really holds under DeepSpeed, ZeRO 0-3 x dp (x tp), next to parallel/planner.py's estimate.

    .venv/bin/python benchmarks/memory.py              # ZeRO 0-3 x dp 1, 2, 4: about 4 minutes on 2 cores
    .venv/bin/python benchmarks/memory.py --tp 2       # the same with 2-way tensor parallelism, dp 1, 2
    python3 benchmarks/memory.py --activations         # on a CUDA GPU: activation bytes of bf16 Llama blocks

Results and what they say about DeepSpeed's internals: benchmarks/RESULTS.md.

Every cell is a real run: torchrun launches dp x tp processes (gloo on CPU, one thread each) of
this file's worker, which builds the model and the engine as the trainer does (foundry.parallel.topology,
foundry.parallel.parallelize, foundry.pretrain.engine), runs two optimizer steps of two micro-batches each (the
first creates the optimizer state) and counts, on each rank during the second, the bytes of the
tensors it holds, by what holds them:

- params: the model's weights this rank keeps (under ZeRO-3 its partitions `p.ds_tensor`, plus the
  few parameters DeepSpeed keeps whole because they are under 1e5 elements);
- grads: gradients wherever DeepSpeed puts them (`GRADIENT_HOLDERS` of foundry.pretrain.memory, whose
  `census` counts every category) outside the bucket, the most seen at any of four probes: inside
  backward (when the embedding's gradient lands, the last one) and after backward, of the first
  micro-batch (accumulating) and of the second (the boundary);
- optim: the tensors the inner torch AdamW steps when they are not the model's own weights (ZeRO's
  fp32 partitions) and its state (exp_avg, exp_avg_sq, step), after the step;
- bucket: DeepSpeed's gradient reduce bucket (`ipg_buckets`), its allocated size, the most seen
  (the gradients of the moment sit in it during backward);
- other: every other live tensor the garbage collector can see after the step (the check that
  nothing big was missed: the input batch, the RoPE tables).

Bytes are the union of the tensors' address ranges, so views and shared storage count once. The
model is the tiny preset widened (hidden 768, MLP 2048) so that every matrix, also split in two
by tp, is over ZeRO-3's 1e5-element persistence threshold and the bytes are not noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
from foundry.parallel.layout import recompute_every  # noqa: E402
from foundry.parallel.planner import Candidate, Memory, ModelShape, estimate  # noqa: E402
from foundry.pretrain.config import ModelConfig, ParallelConfig, TrainConfig  # noqa: E402
from foundry.pretrain.memory import census  # noqa: E402
from foundry.pretrain.model import num_parameters  # noqa: E402

MODEL = ModelConfig(vocab_size=512, hidden_size=768, num_layers=4, num_heads=4, num_kv_heads=2,
                    ffn_hidden_size=2048, max_seq_len=64)
SEQ_LEN, MICRO_BATCH, ACCUMULATION = 32, 1, 2
# A reduce bucket smaller than the model (1/27 of it), as DeepSpeed's 5e8-element default is for every
# model worth a GPU plan: gradients then flow through the bucket as they do at scale.
REDUCE_BUCKET = 1_000_000
MB = 1e6

# The worker: one rank of one cell.


def worker(zero: int, tp: int, precision: str, reduce_bucket: int, out: str) -> None:
    import torch.distributed as dist

    from foundry.parallel.layout import Layout
    from foundry.parallel.parallelize import parallelize
    from foundry.parallel.topology import Topology
    from foundry.pretrain import engine as ds_engine
    from foundry.pretrain.kernels import cross_entropy
    from foundry.pretrain.model import Llama

    ds_engine.init_distributed(torch.device("cpu"))
    world = dist.get_world_size()
    dp = world // tp
    parallel = ParallelConfig(tensor=tp, zero_stage=zero, sequence_parallel=False)
    train = TrainConfig(global_batch_size=MICRO_BATCH * dp * ACCUMULATION, micro_batch_size=MICRO_BATCH,
                        max_steps=10, warmup_steps=1)
    torch.manual_seed(0)
    model = Llama(MODEL)
    topology = Topology(Layout.from_config(parallel, MODEL, world))
    module, loss_fn = parallelize(model, topology, cross_entropy, parallel.sequence_parallel, SEQ_LEN,
                                  lambda keep: None)  # the model has its values
    ds_config = ds_engine.deepspeed_config(train, parallel, ACCUMULATION, precision)
    ds_config["zero_optimization"]["reduce_bucket_size"] = reduce_bucket
    engine = ds_engine.initialize(module, ds_config, mpu=topology)
    generator = torch.Generator().manual_seed(1 + topology.dp_rank)  # tp peers read the same batch
    mine = measure(engine, model, loss_fn, generator)
    ranks: list[Any] = [None] * world
    dist.all_gather_object(ranks, mine)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(ranks))
    del engine, module, model  # before tearing down gloo (see ../shared/README.md)
    dist.barrier()
    dist.destroy_process_group()


def measure(engine: Any, model: torch.nn.Module, loss_fn: Callable, generator: torch.Generator,
            others: bool = True) -> dict[str, Any]:
    """This rank's bytes by holder (see the module docstring) over two optimizer steps of ACCUMULATION
    micro-batches each: the first creates the optimizer state, the second is probed. With `others`,
    also every other live tensor (slow)."""
    probes: dict[str, dict[str, int]] = {}
    current = {"name": None}

    def in_backward(_: torch.Tensor) -> None:
        if current["name"]:
            probes[f"in backward {current['name']}"] = census(engine, model)

    hook = model.model.embed_tokens.weight.register_post_accumulate_grad_hook(in_backward)
    for micro in ("warm-up 1", "warm-up 2", "accumulating", "boundary"):
        tokens = torch.randint(0, MODEL.vocab_size, (MICRO_BATCH, SEQ_LEN + 1), generator=generator)
        loss = loss_fn(engine(tokens[:, :-1]), tokens[:, 1:])
        probing = not micro.startswith("warm-up")
        current["name"] = micro if probing else None
        engine.backward(loss)
        current["name"] = None
        if probing:
            probes[f"after backward {micro}"] = census(engine, model)
        engine.step()
    hook.remove()
    after_step = probes["after step"] = census(engine, model, others=others)
    peak = {key: max(p[key] for p in probes.values()) for key in ("grads", "bucket", "grads in bucket")}
    return {"params": after_step["params"], "optim": after_step["optim"], "other": after_step.get("other", 0),
            **peak, "probes": probes}


# The driver.


def run_cell(zero: int, dp: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Launch one cell under torchrun; return each rank's measurements."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ranks.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={dp * args.tp}",
               __file__, "--worker", "--zero", str(zero), "--tp", str(args.tp), "--precision", args.precision,
               "--reduce-bucket", str(args.reduce_bucket), "--out", out]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"ZeRO-{zero} dp {dp} tp {args.tp} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(Path(out).read_text())


def planned(zero: int, dp: int, tp: int = 1, precision: str = "fp32", reduce_bucket: int = REDUCE_BUCKET) -> Memory:
    """parallel/planner.py's estimate for one cell of this benchmark."""
    layout = Candidate(tp=tp, dp=dp, zero_stage=zero, micro_batch=MICRO_BATCH, sequence_parallel=False)
    return estimate(ModelShape.of(MODEL), layout, SEQ_LEN, precision, global_batch=MICRO_BATCH * dp * ACCUMULATION,
                    reduce_bucket=reduce_bucket)


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Rank 0's measured bytes next to the planner's estimate for the same layout, and their ratio."""
    head = (f"{'zero':>4} {'dp':>3} {'tp':>3} |" + "".join(f" {k:>7} {'plan':>7} {'x':>5} |" for k in
            ("params", "grads", "optim")) + f" {'bucket':>7} {'plan':>7} | {'other':>5} | spread")
    lines = [head, "-" * len(head)]
    for row in rows:
        est = planned(row["zero"], row["dp"], row["tp"], args.precision, args.reduce_bucket)
        r0 = row["ranks"][0]
        cells = ""
        for key, plan_bytes in (("params", est.params), ("grads", est.grads), ("optim", est.optimizer)):
            cells += f" {r0[key] / MB:>7.2f} {plan_bytes / MB:>7.2f} {r0[key] / plan_bytes:>5.2f} |"
        # How far the other ranks are from rank 0: partitions cut through parameters, and ZeRO-2 keeps the
        # accumulated gradients of every parameter its partition touches whole.
        spread = max(abs(r[k] - r0[k]) / max(r0[k], 1) for r in row["ranks"] for k in ("params", "grads", "optim"))
        lines.append(f"{row['zero']:>4} {row['dp']:>3} {row['tp']:>3} |{cells} {r0['bucket'] / MB:>7.0f} "
                     f"{est.bucket / MB:>7.0f} | {r0['other'] / MB:>5.2f} | {spread:.1%}")
    return "\n".join(lines)


def scaling(rows: list[dict[str, Any]]) -> str:
    """Each ZeRO stage's rank-0 bytes at dp = 2, 4 as a fraction of dp = 1: what partitioning divides."""
    expect = {0: "nothing divided", 1: "optim ~ 1/dp", 2: "optim, grads ~ 1/dp", 3: "optim, grads, params ~ 1/dp"}
    lines = []
    for (zero, tp) in sorted({(r["zero"], r["tp"]) for r in rows}):
        cells = {r["dp"]: r["ranks"][0] for r in rows if (r["zero"], r["tp"]) == (zero, tp)}
        if 1 not in cells or len(cells) < 2:
            continue
        parts = []
        for key in ("params", "grads", "optim"):
            parts.append(f"{key} " + " : ".join(f"{cells[dp][key] / cells[1][key]:.2f}" for dp in sorted(cells)))
        lines.append(f"ZeRO-{zero} tp {tp}, dp {' : '.join(map(str, sorted(cells)))} -> " + ", ".join(parts)
                     + f"   (expected: {expect[zero]})")
    return "\n".join(lines)


# Activations, on a GPU.

BLOCK_VARIANTS = ((8, 14336), (32, 14336), (8, 11008), (32, 11008), (8, 8192))  # (kv heads, MLP width)
# Llama 3 8B with 4 of its 32 blocks: the block terms and the 128256-wide logits at full size.
MODEL_CASES = ((2048, 1, "off"), (4096, 1, "off"), (4096, 2, "off"), (4096, 2, "selective"), (4096, 2, "full"))


def kept_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """CUDA bytes still allocated after `forward`, less its output: what it saved for backward."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = forward()
    return torch.cuda.memory_allocated() - before - out.numel() * out.element_size()


def activations() -> str:
    """Bytes a bf16 Llama keeps from forward for backward, next to the planner's: one block per
    (kv heads, MLP width) of Llama 3 8B at s=4096, b=2, then a 4-block model with its head and
    loss, without the planner's recompute working set (it lives in backward only)."""
    from foundry.pretrain.kernels import cross_entropy
    from foundry.parallel.planner import PRECISIONS, activation_bytes, layer_activation_bytes
    from foundry.pretrain.config import load_model_config
    from foundry.pretrain.model import Llama, ModelOptions, TransformerBlock, rope_cos_sin, rope_frequencies

    base = load_model_config(str(REPO / "configs/models/llama3-8b.yaml"))
    device, bf16 = torch.device("cuda"), torch.bfloat16
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, SDPA attention",
             "one block, seq 4096 x micro 2: bytes kept / (s*b*h)",
             f"{'kv':>4} {'ffn':>6} {'kept':>7} {'plan':>7} {'x':>5}"]
    s, b = 4096, 2
    for kv, ffn in BLOCK_VARIANTS:
        cfg = dataclasses.replace(base, num_kv_heads=kv, ffn_hidden_size=ffn)
        with device:
            block = TransformerBlock(cfg).to(bf16)
        cos, sin = (t.to(device) for t in rope_cos_sin(rope_frequencies(cfg.hidden_size // cfg.num_heads, cfg), s))
        x = torch.randn(b, s, cfg.hidden_size, device=device, dtype=bf16, requires_grad=True) * 1  # not a leaf
        sbh = s * b * cfg.hidden_size
        kept = kept_bytes(lambda: block(x, cos, sin)) / sbh
        plan = layer_activation_bytes(ModelShape.of(cfg), Candidate(micro_batch=b), s, attention_scores=False)[0] / sbh
        lines.append(f"{kv:>4} {ffn:>6} {kept:>7.3f} {plan:>7.3f} {kept / plan:>5.3f}")
        del block, x
    cfg = dataclasses.replace(base, num_layers=4)
    shape = ModelShape.of(cfg)
    lines += [f"llama3-8b with {cfg.num_layers} blocks, head and loss: MB kept after the loss",
              f"{'seq':>5} {'micro':>5} {'ckpt':<9} {'kept':>7} {'plan':>7} {'x':>5}"]
    for seq, micro, ckpt in MODEL_CASES:
        layout = Candidate(micro_batch=micro, checkpointing=ckpt)
        every = recompute_every(ckpt, layout.checkpoint_interval)
        with device:
            model = Llama(cfg, ModelOptions(recompute_every=every)).to(bf16)
        tokens = torch.randint(0, cfg.vocab_size, (micro, seq + 1), device=device)
        kept = kept_bytes(lambda: cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]))
        rebuilt = layer_activation_bytes(shape, layout, seq, attention_scores=False)[0] if ckpt != "off" else 0
        plan = activation_bytes(shape, layout, seq, PRECISIONS["bf16"], stage=0, in_flight=1) - rebuilt
        lines.append(f"{seq:>5} {micro:>5} {ckpt:<9} {kept / MB:>7.0f} {plan / MB:>7.0f} {kept / plan:>5.3f}")
        del model, tokens
        torch.cuda.empty_cache()
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2, 3], help="ZeRO stages to run")
    parser.add_argument("--dp", type=int, nargs="+", help="data-parallel sizes (default: 1 2 4, or 1 2 with --tp 2)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="fp32 (the trainer's choice on CPU) or bf16 (emulated on CPU: slower)")
    parser.add_argument("--reduce-bucket", type=int, default=REDUCE_BUCKET,
                        help="DeepSpeed's zero_optimization.reduce_bucket_size in elements (default %(default)s: "
                        "smaller than the model, as DeepSpeed's 5e8 default is for any model worth a GPU plan; "
                        "500000000 runs the trainer's exact config)")
    parser.add_argument("--json", help="also write every rank's measurements (and probes) here")
    parser.add_argument("--activations", action="store_true",
                        help="instead: on a CUDA GPU, activation bytes of bf16 Llama blocks against the planner's")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.zero[0], args.tp, args.precision, args.reduce_bucket, args.out)
        return 0
    if args.activations:
        print(activations())
        return 0
    dps = args.dp or ([1, 2] if args.tp > 1 else [1, 2, 4])
    print(f"model: hidden {MODEL.hidden_size}, {MODEL.num_layers} layers, {num_parameters(MODEL):,} parameters "
          f"({num_parameters(MODEL) * 4 / MB:.2f} MB in fp32) | {args.precision} | micro-batch {MICRO_BATCH} x seq "
          f"{SEQ_LEN}, {ACCUMULATION} micro-batches per step | reduce bucket {args.reduce_bucket:,} elements | "
          f"torch {torch.__version__}, deepspeed "
          f"{__import__('deepspeed').__version__}", flush=True)
    rows, start = [], time.perf_counter()
    for zero in [z for z in args.zero if z or args.precision != "bf16"]:  # bf16 needs ZeRO (engine.py)
        for dp in dps:
            t0 = time.perf_counter()
            rows.append({"zero": zero, "dp": dp, "tp": args.tp, "ranks": run_cell(zero, dp, args)})
            print(f"  ZeRO-{zero} dp {dp} tp {args.tp}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print("MB on rank 0, measured next to parallel/planner.py's estimate (x = measured / plan):")
    print(table(rows, args))
    print(scaling(rows))
    print(f"{len(rows)} runs in {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
