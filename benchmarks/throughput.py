"""Training throughput side by side, in one process on one device: foundry's step against plain PyTorch.

    .venv/bin/python benchmarks/throughput.py                                   # CPU: tiny preset, fp32
    python benchmarks/throughput.py --model configs/models/llama3.2-1b.yaml \\
        --seq-len 2048 --micro-batch 4 --precision bf16                         # one GPU

Three contenders train the same model (same config, batch, sequence length, precision, AdamW with
the same hyper-parameters, gradient clipping at 1.0) on the same random tokens:

- foundry: foundry.pretrain.model.Llama through the DeepSpeed engine exactly as the trainer builds it
  (pretrain/engine.py: ZeRO stage 1, torch AdamW, WarmupCosineLR, bf16 master weights on GPU);
- plain PyTorch: the same Llama module in a hand-written loop (torch.optim.AdamW, fused on GPU,
  torch.autocast for bf16), the reference for the framework's overhead;
- transformers: Hugging Face's LlamaForCausalLM (SDPA attention) in the same loop, the baseline
  users know.

Each runs `--warmup` steps, then `--steps` timed steps (synchronised, median reported); on CPU the
contenders take turns in `--rounds` rounds, so the machine's drift hits them alike. The table
gives step time, tokens/s, MFU (the 6N + 12 L H Dh S count of pretrain/flops.py against the
device's bf16 peak; n/a on CPU), peak memory and the kernel paths. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from foundry.pretrain import engine as ds_engine
from foundry.pretrain.config import ParallelConfig, TrainConfig, load_model_config
from foundry.pretrain.convert import to_hf_config
from foundry.pretrain.flops import device_peak_flops, flops_per_token, mfu
from foundry.pretrain.kernels import attention_path
from foundry.pretrain.metrics import peak_memory_gib
from foundry.pretrain.model import Llama

Step = Callable[[torch.Tensor, torch.Tensor], None]


def foundry_step(model: Llama, train: TrainConfig, precision: str) -> Step:
    ds_config = ds_engine.deepspeed_config(train, ParallelConfig(zero_stage=1), 1, precision)
    engine = ds_engine.initialize(model, ds_config)

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> None:
        logits = engine(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        engine.backward(loss)
        engine.step()
    return step


def plain_step(model: torch.nn.Module, train: TrainConfig, precision: str, hf: bool) -> Step:
    fused = next(model.parameters()).is_cuda
    optimizer = torch.optim.AdamW(ds_engine.param_groups(model, train.weight_decay), lr=train.lr,
                                  betas=tuple(train.betas), eps=train.eps, fused=fused)
    device_type = next(model.parameters()).device.type

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(inputs).logits if hf else model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def timed(step: Step, batch: tuple[torch.Tensor, torch.Tensor], n: int, device: torch.device) -> list[float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step(*batch)
        sync()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="configs/models/tiny.yaml")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10, help="CPU: interleaved rounds of steps/rounds steps each")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the tests' and trainer's setting)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["foundry", "plain", "transformers"])
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    cfg = load_model_config(args.model)
    train = TrainConfig(max_steps=args.steps + args.warmup + 1, warmup_steps=1, global_batch_size=args.micro_batch,
                        micro_batch_size=args.micro_batch, lr=1e-4)
    tokens = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    batch = (tokens[:, :-1].to(device), tokens[:, 1:].to(device))
    ds_engine.init_distributed(device)  # DeepSpeed wants a process group, even of one
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)  # its start-up chatter is not the measurement

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    attn = attention_path(torch.empty(1, 1, 1, 1, device=device, dtype=dtype))
    contenders: dict[str, Callable[[], tuple[Step, str]]] = {
        "foundry": lambda: (foundry_step(Llama(cfg).to(device), train, precision),
                            f"attention {attn}, DeepSpeed ZeRO-1 + torch AdamW{' (fused)' if device.type == 'cuda' else ''}"),
        "plain": lambda: (plain_step(Llama(cfg).to(device), train, precision, hf=False),
                          f"attention {attn}, torch AdamW{' fused' if device.type == 'cuda' else ''}"),
        "transformers": lambda: (plain_step(_hf_model(cfg, device), train, precision, hf=True),
                                 "attention sdpa (HF), torch AdamW" + (" fused" if device.type == "cuda" else "")),
    }
    names = {"foundry": "foundry (DeepSpeed engine)", "plain": "plain PyTorch, same model",
             "transformers": "transformers LlamaForCausalLM"}
    flops_token = flops_per_token(cfg, args.seq_len)
    peak = device_peak_flops(device)
    chosen = [key for key in contenders if key not in args.skip]
    steps, kernel_paths, times, memory = {}, {}, {key: [] for key in chosen}, {}
    if device.type == "cpu":
        # Interleaved rounds: a shared 2-core machine drifts by 10-20% over a minute, which a sequential
        # A-then-B comparison would read as a difference. (Three 1B models do not fit one GPU together.)
        for key in chosen:
            torch.manual_seed(0)
            steps[key], kernel_paths[key] = contenders[key]()
            timed(steps[key], batch, args.warmup, device)
        for _ in range(args.rounds):
            for key in chosen:
                times[key] += timed(steps[key], batch, args.steps // args.rounds, device)
        memory = {key: peak_memory_gib(device) for key in chosen}
    else:
        for key in chosen:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.manual_seed(0)
            step, kernel_paths[key] = contenders[key]()
            timed(step, batch, args.warmup, device)
            times[key] = timed(step, batch, args.steps, device)
            memory[key] = peak_memory_gib(device)
            del step
    rows = []
    for key in chosen:
        t = statistics.median(times[key])
        tok_s = args.micro_batch * args.seq_len / t
        rows.append((names[key], t, tok_s, mfu(tok_s, flops_token, peak, 1), memory[key], kernel_paths[key]))

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {args.threads} thread)"
    order = f"interleaved in {args.rounds} rounds" if device.type == "cpu" else "one contender after another"
    print(f"{Path(args.model).stem}, seq {args.seq_len}, micro-batch {args.micro_batch}, {precision}, {device_name}; "
          f"torch {torch.__version__}; median step of {args.steps} after {args.warmup} warm-up, {order}")
    print()
    print("| contender | step ms | tokens/s | MFU | peak mem GiB | kernels |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    reference = next((r[1] for r in rows if r[0].startswith("plain")), None)
    for name, t, tok_s, util, mem, kernels in rows:
        rel = f" ({t / reference:.2f}x plain)" if reference and not name.startswith("plain") else ""
        print(f"| {name} | {t * 1e3:.1f}{rel} | {tok_s:,.0f} | {'n/a' if util is None else f'{util:.1%}'} | "
              f"{mem:.2f} | {kernels} |")
    if device.type == "cpu":
        print("\nCPU peak memory is the process's peak RSS (all contenders together).")


def _hf_model(cfg, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = to_hf_config(cfg)
    hf["attn_implementation"] = "sdpa"
    return LlamaForCausalLM(LlamaConfig(**hf)).to(device)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
