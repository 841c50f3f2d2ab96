"""What a checkpoint save costs: bytes written per rank, and the training time it takes, before and after
issue 21 (each rank writes DeepSpeed's own files once, in the background).

    .venv/bin/python benchmarks/checkpoint_io.py                  # both parts, before and after: ~6 min on 2 cores
    .venv/bin/python benchmarks/checkpoint_io.py --part bytes     # part 1 only (~3 min)
    .venv/bin/python benchmarks/checkpoint_io.py --part stall --no-before

"Before" is the code of commit BEFORE_REF (--before), the last one whose every save also wrote the layout-free
copy `universal/` (fp32 weights and both AdamW moments, gathered over data parallelism and written again by
data-parallel rank 0), synchronously on the training thread. It is taken with `git archive` into a temporary
directory and run from there as the package `foundry` (a `foundry/` folder of links first on PYTHONPATH, ahead
of the editable install's finder, which Python asks last); the script checks that the processes import it.
"After" is this working tree.

Part 1, bytes. The tiny preset (configs/models/tiny.yaml + configs/quickstart.yaml), ZeRO-1, 4 processes at
(tp,pp,dp) = (2,1,2) and (1,2,2), two steps and one save (step 2). Every file the save wrote (in the step's
directory, and next to it: the pointer, DeepSpeed's recovery scripts) is given to the rank that wrote it: after,
by COMPLETE.json's `ranks[r]["files"]` (COMPLETE.json and the pointer: rank 0); before, by DeepSpeed's naming
(`zero_pp_rank_D_mp_rank_M_optim_states.pt`: dp D of model-parallel rank M = pp * tp + tp;
`mp_rank_M_model_states.pt` and `layer_L-model_T-model_states.pt`: dp 0 of model-parallel rank M, of tp rank T
and the pipeline stage holding layer L; `universal/tpT_ppP.pt`: dp 0; `rng_rankN.pt`: rank N; the tokenizer,
marker, pointer and recovery scripts: rank 0). State files (model, optimizer, layers, universal) are set next
to the analytic size of one copy of the model plus its optimizer state: 4 bytes per parameter for the weights
(fp32, the training dtype on CPU) on data-parallel rank 0, and 12 for the fp32 master and AdamW's two moments,
1/dp on each rank (ZeRO-1). Parameters are counted on each rank's model as the trainer builds it (torch's fake
process group and fake tensors, pretrain/simulate.py): tensor-parallel slices with the vocabulary's padding, and
the norms each tp rank keeps whole, so each model-parallel rank counts what its files hold. Small files (RNG,
tokenizer, marker, pointer, scripts) are listed apart.

Part 2, the stall. One process (data.workers=0: the training thread and the writer each have a core when the
machine is otherwise idle), a model big enough that a save takes several steps (the tiny preset widened to
hidden 768, MLP 2048: 26.7M parameters, 428 MB of state), 64 tokens per step, a save every --interval steps.
Step times come from metrics.jsonl (tokens per step / tokens_per_s at log_interval 1); the save's phases from
the log lines rank 0 prints, stamped by this script as they arrive: "state copied to host memory in X s" (the
training thread's part), "saved: N files, M MiB, durable T s" (the background write, fsync and read-back).
The save of step S runs after step S's record, so step S+1's time holds the host copy; steps that began
before the write was durable ran while it was written. Before, the step after a save holds the whole save.

Results and what they show: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BEFORE_REF = "e9b69d1"  # the last commit whose saves wrote universal/ synchronously
PACKAGES = ("pretrain", "parallel", "data", "launch")
TINY = ["configs/models/tiny.yaml", "configs/quickstart.yaml"]
SHORT = ["train.global_batch_size=8", "train.micro_batch_size=2", "train.warmup_steps=1", "data.seq_len=64",
         "tracking.log_interval=1", "tracking.mlflow=false", "eval.datasets=[]", "checkpoint.resume=false"]
LAYOUTS = {"(2,1,2)": ["parallel.tensor=2"], "(1,2,2)": ["parallel.pipeline=2"]}
STALL_MODEL = """\
# benchmarks/checkpoint_io.py: the tiny preset widened (as benchmarks/memory.py's), so that a save takes steps
model:
  vocab_size: 512
  hidden_size: 768
  num_layers: 4
  num_heads: 4
  num_kv_heads: 2
  ffn_hidden_size: 2048
  rope_theta: 10000.0
  rope_scaling: null
  norm_eps: 1.0e-5
  tie_embeddings: false
  max_seq_len: 1024
"""
KB, MB = 1e3, 1e6


# Running the trainer, before or after.


@dataclass
class Code:
    """Where a version of foundry runs from: its working directory (configs/ relative to it) and environment."""

    name: str
    cwd: Path
    env: dict[str, str]


def after_code() -> Code:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return Code("after", REPO, env)


def before_code(ref: str, tmp: Path) -> Code:
    """Commit `ref`'s packages and configs, unpacked under `tmp`, importable as `foundry` ahead of the editable
    install (checked: the trainer's checkpoint module must come from there, and be the one with universal/)."""
    src, pkg = tmp / "before-src", tmp / "before-pkg" / "foundry"
    src.mkdir(parents=True)
    pkg.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref, *PACKAGES, "configs"], cwd=REPO, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    (pkg / "__init__.py").touch()
    for name in PACKAGES:
        (pkg / name).symlink_to(src / name)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(pkg.parent)}
    probe = subprocess.run([sys.executable, "-c", "import os, foundry.pretrain.checkpoint as c, "
                            "foundry.launch.cli as l; print(os.path.realpath(c.__file__), os.path.realpath(l.__file__), "
                            "hasattr(c, 'save_universal'))"], cwd=src, env=env, capture_output=True, text=True)
    where = (probe.stdout.strip().splitlines() or [""])[-1].split()
    if probe.returncode or len(where) != 3 or not all(w.startswith(str(src)) for w in where[:2]) or where[2] != "True":
        raise RuntimeError(f"the before code ({ref}) does not import from {src}: {probe.stdout}{probe.stderr[-2000:]}")
    return Code(f"before ({ref})", src, env)


@dataclass
class Run:
    """One torchrun job: its output lines, each stamped (time.monotonic) as it arrived, and its run directory."""

    run_dir: Path
    lines: list[tuple[float, str]] = field(default_factory=list)
    seconds: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at the start and the end

    def metrics(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]


def torchrun(code: Code, nproc: int, args: list[str], run_dir: Path, timeout: float = 600) -> Run:
    """`torchrun --standalone -m foundry.launch.cli train ARGS` with `code`; raises when it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "foundry.launch.cli", "train", *args, f"train.run_dir={run_dir}"]
    env = {**code.env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run = Run(run_dir, load=(os.getloadavg()[0], 0.0))
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=code.cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    try:
        for line in proc.stdout:
            run.lines.append((time.monotonic(), line))
        proc.wait()
    finally:
        timer.cancel()
    run.seconds, run.load = time.monotonic() - started, (run.load[0], os.getloadavg()[0])
    if proc.returncode != 0:
        tail = "".join(line for _, line in run.lines[-60:])
        raise RuntimeError(f"{code.name}: {' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return run


def stdlib_shards(tmp: Path) -> Path:
    """runs/data/stdlib when the quickstart has prepared it, else a few stdlib packages prepared as the tests'
    `stdlib_shards` fixture does (512-token BPE, the tiny preset's vocabulary)."""
    ready = REPO / "runs" / "data" / "stdlib"
    if (ready / "manifest.json").is_file():
        return ready
    from foundry.data.prepare import PrepareOptions, prepare

    stdlib, out = Path(sysconfig.get_paths()["stdlib"]), tmp / "stdlib_shards"
    prepare([str(stdlib / p) for p in ("json", "email", "logging", "concurrent", "importlib")],
            PrepareOptions(out=out, pattern="**/*.py", vocab_size=512, sample_tokens=512, shard_tokens=20_000,
                           workers=2, on_error="skip"))
    return out


# Part 1: bytes per save.


@dataclass
class Rank:
    rank: int
    tp: int
    pp: int
    dp: int
    params: int  # parameters of its model-parallel rank (tp slice of its pipeline stage)


def ranks_of(layout_args: list[str], world: int, seq_len: int) -> list[Rank]:
    """Every rank's coordinates and parameter count, from the model as the trainer builds it for that rank (fake
    process group, fake tensors: shapes only)."""
    import logging

    import torch

    from foundry.parallel.layout import Layout
    from foundry.parallel.topology import Topology
    from foundry.pretrain.build import build_model, model_options
    from foundry.pretrain.config import load_config
    from foundry.pretrain.simulate import _fake_tensors, fake_world

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    cfg = load_config([str(REPO / f) for f in TINY], [*SHORT, *layout_args, f"launch.procs_per_node={world}"])
    layout = Layout.from_config(cfg.parallel, cfg.model, world)
    out = []
    for rank in range(world):
        with fake_world(rank, world):
            topology = Topology(layout)
            with _fake_tensors(torch.float32):
                options = model_options(cfg.kernels, cfg.parallel, layout, None)
                _, module, _ = build_model(cfg.model, cfg.parallel, options, topology, torch.device("cpu"),
                                           seed=cfg.train.seed, seq_len=seq_len, init_from=None)
            out.append(Rank(rank, topology.tp_rank, topology.pp_rank, topology.dp_rank,
                            sum(p.numel() for p in module.parameters())))
    return out


def stage_parts(layout_args: list[str], pp: int, seq_len: int) -> list[int]:
    """The PipelineModule's layer boundaries per stage (parallel/pipeline.py: layer i + 1 is block i)."""
    from foundry.parallel.planner import ModelShape
    from foundry.parallel.stages import stage_blocks
    from foundry.pretrain.config import load_model_config

    model = load_model_config(str(REPO / TINY[0]))
    stages = stage_blocks(ModelShape.of(model), pp, seq_len)
    return [0, *(r.start + 1 for r in stages[1:]), model.num_layers + 3]


SMALL = re.compile(r"rng_rank\d+\.pt|tokenizer\.json|COMPLETE\.json|latest_complete|zero_to_\w+\.py")


def written(ckpt_dir: Path, tag: str) -> dict[str, int]:
    """Every file of the save of `tag`: the step's directory, and what it wrote next to it; path -> bytes."""
    files = {str(p.relative_to(ckpt_dir / tag)): p.stat().st_size for p in (ckpt_dir / tag).rglob("*") if p.is_file()}
    for p in ckpt_dir.iterdir():
        if p.is_file():
            files[f"../{p.name}"] = p.stat().st_size
    return files


def owner_before(name: str, ranks: list[Rank], tp: int, parts: list[int]) -> int | None:
    """The rank that wrote `name`, by DeepSpeed's naming (the module docstring lists the rules)."""
    def at(tp_rank: int, pp_rank: int, dp_rank: int) -> int:
        return next(r.rank for r in ranks if (r.tp, r.pp, r.dp) == (tp_rank, pp_rank, dp_rank))

    base = name.removeprefix("../")
    if m := re.fullmatch(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt", base):
        mp = int(m.group(2))
        return at(mp % tp, mp // tp, int(m.group(1)))
    if m := re.fullmatch(r"mp_rank_(\d+)_model_states\.pt", base):
        mp = int(m.group(1))
        return at(mp % tp, mp // tp, 0)
    if m := re.fullmatch(r"layer_(\d+)-model_(\d+)-model_states\.pt", base):
        layer = int(m.group(1))
        stage = next(s for s in range(len(parts) - 1) if parts[s] <= layer < parts[s + 1])
        return at(int(m.group(2)), stage, 0)
    if m := re.fullmatch(r"universal/tp(\d+)_pp(\d+)\.pt", base):
        return at(int(m.group(1)), int(m.group(2)), 0)
    if m := re.fullmatch(r"rng_rank(\d+)\.pt", base):
        return int(m.group(1))
    if SMALL.fullmatch(base):
        return 0  # tokenizer, marker, pointer, DeepSpeed's recovery scripts: rank 0
    return None


def owner_after(name: str, marker: dict[str, Any]) -> int | None:
    base = name.removeprefix("../")
    if base in ("COMPLETE.json", "latest_complete"):
        return 0
    return next((r for r, rec in enumerate(marker["ranks"]) if name in rec["files"]), None)


def bytes_part(before: Code | None, after: Code, data: Path, tmp: Path) -> None:
    """Part 1: tables of bytes per rank and in total, before and after, next to the analytic size."""
    codes = [c for c in (before, after) if c is not None]
    summary = []
    for label, layout_args in LAYOUTS.items():
        world, seq_len = 4, 64
        ranks = ranks_of(layout_args, world, seq_len)
        tp, pp, dp = (max(getattr(r, k) for r in ranks) + 1 for k in ("tp", "pp", "dp"))
        parts = stage_parts(layout_args, pp, seq_len)
        analytic = {r.rank: (4 * r.params if r.dp == 0 else 0) + 12 * r.params / dp for r in ranks}
        held = sum(r.params for r in ranks if r.dp == 0)
        by_code: dict[str, dict[str, Any]] = {}
        for code in codes:
            args = [*TINY, *SHORT, *layout_args, "train.max_steps=2", "checkpoint.interval=2",
                    f"data.datasets=[{{path: {data}}}]", "data.streams=4"]
            run = torchrun(code, world, args, tmp / f"bytes-{code.name.split()[0]}-{tp}{pp}{dp}")
            ckpt = run.run_dir / "checkpoints"
            files = written(ckpt, "step00000002")
            if code is after:
                marker = json.loads((ckpt / "step00000002" / "COMPLETE.json").read_text())
                owners = {name: owner_after(name, marker) for name in files}
            else:
                owners = {name: owner_before(name, ranks, tp, parts) for name in files}
            by_code[code.name] = {"files": files, "owners": owners}
            print(f"  {label} {code.name}: {run.seconds:.0f} s, load {run.load[0]:.1f}-{run.load[1]:.1f}",
                  file=sys.stderr, flush=True)
        print(f"\n(tp,pp,dp) = {label}, ZeRO-1, tiny preset: {held:,} parameters held over the model-parallel ranks "
              f"(norms counted once per tp rank; vocabulary {512} split {tp} ways, padding "
              f"{(-512) % tp} rows). kB = 1e3 bytes, one save (step 2).")
        head = f"{'rank':>4} {'(tp,pp,dp)':>10} {'analytic':>9} |"
        for code in codes:
            head += f" {code.name.split()[0] + ' state':>13} {'small':>7} {'x':>6} |"
        print(head)
        print("-" * len(head))
        totals = {c.name: [0, 0] for c in codes}
        for r in ranks:
            row = f"{r.rank:>4} {f'({r.tp},{r.pp},{r.dp})':>10} {analytic[r.rank] / KB:>9.1f} |"
            for code in codes:
                got = by_code[code.name]
                state = sum(s for n, s in got["files"].items() if got["owners"][n] == r.rank and not SMALL.fullmatch(
                    n.removeprefix("../").split("/")[-1]))
                small = sum(s for n, s in got["files"].items() if got["owners"][n] == r.rank and SMALL.fullmatch(
                    n.removeprefix("../").split("/")[-1]))
                totals[code.name][0] += state
                totals[code.name][1] += small
                row += f" {state / KB:>13.1f} {small / KB:>7.1f} {state / analytic[r.rank]:>6.3f} |"
            print(row)
        total_analytic = sum(analytic.values())
        row = f"{'all':>4} {'':>10} {total_analytic / KB:>9.1f} |"
        for code in codes:
            state, small = totals[code.name]
            row += f" {state / KB:>13.1f} {small / KB:>7.1f} {state / total_analytic:>6.3f} |"
            unowned = [n for n, o in by_code[code.name]["owners"].items() if o is None]
            summary.append((label, code.name, state, small, total_analytic, unowned))
        print(row)
        for code in codes:
            got = by_code[code.name]
            print(f"  {code.name} files by rank:")
            for r in [*ranks, None]:
                names = sorted(n for n, o in got["owners"].items() if o == (r.rank if r else None))
                if names:
                    listing = ", ".join(f"{n} {got['files'][n] / KB:.1f}" for n in names)
                    print(f"    {'rank ' + str(r.rank) if r else 'unattributed'}: {listing}")
    print("\nTotal bytes per save against the analytic 16 bytes per parameter held (4 weights + 12 optimizer):")
    head = (f"{'layout':>8} {'code':>18} {'state MB':>9} {'small MB':>9} {'total MB':>9} {'analytic':>9} "
            f"{'state/an.':>9} {'total/an.':>9}")
    print(head)
    print("-" * len(head))
    for label, name, state, small, total_analytic, unowned in summary:
        print(f"{label:>8} {name:>18} {state / MB:>9.3f} {small / MB:>9.3f} {(state + small) / MB:>9.3f} "
              f"{total_analytic / MB:>9.3f} {state / total_analytic:>9.3f} {(state + small) / total_analytic:>9.3f}"
              + (f"  unattributed: {unowned}" if unowned else ""))


# Part 2: the training stall of a save.


STEP = re.compile(r"\[rank 0\] step (\d+)/\d+ \|")
COPIED = re.compile(r"checkpoint step(\d{8}): state copied to host memory in ([\d.]+) s")
SAVED_AFTER = re.compile(r"checkpoint \S+/step(\d{8}) saved: (\d+) files, ([\d.]+) MiB, durable ([\d.]+) s")
SAVED_BEFORE = re.compile(r"checkpoint \S+/step(\d{8}) saved \(\d+ kept\)")


@dataclass
class Save:
    step: int
    begun: float  # when the step's record line arrived (the save follows it)
    copied: float | None = None  # after: when the host copy was done
    copy_s: float | None = None  # after: the copy's own duration, as logged
    durable: float = 0.0  # when the save was complete
    logged_write_s: float | None = None  # after: "durable T s", as logged
    mib: float | None = None


def stall_run(code: Code, data: Path, tmp: Path, steps: int, interval: int, seq_len: int) -> dict[str, Any]:
    model = tmp / "stall-model.yaml"
    model.write_text(STALL_MODEL)
    args = [str(model), str(code.cwd / "configs/quickstart.yaml"), f"train.max_steps={steps}",
            f"checkpoint.interval={interval}", "train.global_batch_size=1", "train.micro_batch_size=1",
            "train.warmup_steps=1", f"data.seq_len={seq_len}", "tracking.log_interval=1", "tracking.mlflow=false",
            "eval.datasets=[]", "checkpoint.resume=false", f"data.datasets=[{{path: {data}}}]", "data.streams=1",
            "data.workers=0"]
    run = torchrun(code, 1, args, tmp / f"stall-{code.name.split()[0]}")
    stamps: dict[int, float] = {}
    saves: dict[int, Save] = {}
    for at, line in run.lines:
        if m := STEP.search(line):
            stamps[int(m.group(1))] = at
        elif m := COPIED.search(line):
            s = saves.setdefault(int(m.group(1)), Save(int(m.group(1)), stamps[int(m.group(1))]))
            s.copied, s.copy_s = at, float(m.group(2))
        elif m := SAVED_AFTER.search(line):
            s = saves[int(m.group(1))]
            s.durable, s.mib, s.logged_write_s = at, float(m.group(3)), float(m.group(4))
        elif m := SAVED_BEFORE.search(line):
            step = int(m.group(1))
            saves[step] = Save(step, stamps[step], durable=at)
    metrics = run.metrics()
    step_s = {m["step"]: m["tokens"] / m["step"] / m["tokens_per_s"] for m in metrics}
    saving = {s.step + 1 for s in saves.values() if s.step + 1 in step_s}
    in_flight: dict[int, list[int]] = {}
    for s in saves.values():
        # steps after the saving one that began (previous record line) before the save was durable
        in_flight[s.step] = [n for n in step_s if n > s.step + 1 and stamps[n - 1] < s.durable]
    busy = saving | {n for ns in in_flight.values() for n in ns}
    normal = [step_s[n] for n in step_s if n > 1 and n not in busy]
    return {"code": code.name, "run": run, "steps": step_s, "stamps": stamps, "saves": sorted(saves.values(),
            key=lambda s: s.step), "saving": saving, "in_flight": in_flight, "normal": normal}


def stall_part(before: Code | None, after: Code, data: Path, tmp: Path, steps: int, interval: int,
               seq_len: int) -> None:
    from foundry.pretrain.config import load_model_config
    from foundry.pretrain.model import num_parameters

    (tmp / "stall-model.yaml").write_text(STALL_MODEL)
    n = num_parameters(load_model_config(str(tmp / "stall-model.yaml")))
    results = []
    for code in [c for c in (after, before) if c is not None]:
        r = stall_run(code, data, tmp, steps, interval, seq_len)
        results.append(r)
        print(f"  stall {code.name}: {r['run'].seconds:.0f} s, load {r['run'].load[0]:.1f}-{r['run'].load[1]:.1f}",
              file=sys.stderr, flush=True)
    print(f"\nOne process, {n:,} parameters ({16 * n / MB:.0f} MB of state in fp32), {seq_len} tokens per step, "
          f"{steps} steps, a save every {interval}. Seconds; x = / the run's normal step time.\n"
          "host copy: as logged; save call: the training thread's time in the save (the step's record to the "
          "'copied' line; before: the whole save); saving step: the step after the save, which holds it; steps "
          "during write: those begun before the save was durable; write: the 'copied' line to the 'saved' line "
          "(before: the whole save); lost: training time lost to the save, the saving step's and those steps' time "
          "over the normal step's.")
    for r in results:
        normal = statistics.median(r["normal"])
        spread = (min(r["normal"]), max(r["normal"]))
        print(f"\n{r['code']}: normal step (median of {len(r['normal'])} steps with no save in flight) {normal:.2f} s "
              f"(range {spread[0]:.2f}-{spread[1]:.2f}); 1-minute load average {r['run'].load[0]:.1f} at the start, "
              f"{r['run'].load[1]:.1f} at the end")
        head = (f"{'save':>5} {'host copy':>10} {'save call':>10} {'saving step':>12} {'x':>5} "
                f"{'steps during write':>26} {'write':>7} {'x':>5} {'lost':>6}")
        print(head)
        print("-" * len(head))
        for s in r["saves"]:
            nxt = r["steps"].get(s.step + 1)
            flight = [r["steps"][k] for k in r["in_flight"][s.step]]
            if s.copied is not None:  # after: the write runs from the end of the host copy until durable
                write = s.durable - s.copied
                copy, call = f"{s.copy_s:.2f}", f"{s.copied - s.begun:.2f}"
            else:  # before: the whole save, from the step's record to the "saved" line
                write = s.durable - s.begun
                copy, call = "-", f"{write:.2f}"
            previous = [p for p in r["saves"] if p.step < s.step]
            waited = " (waited)" if previous and previous[-1].durable > s.begun else ""
            lost = (nxt - normal if nxt else 0) + sum(t - normal for t in flight)
            during = (f"{len(flight)}: median {statistics.median(flight):.2f} x{statistics.median(flight) / normal:.2f}"
                      if flight else "0")
            print(f"{s.step:>5} {copy:>10} {call:>10} {(f'{nxt:.2f}' if nxt else '(end)'):>12} "
                  f"{(f'{nxt / normal:.2f}' if nxt else ''):>5} {during:>26} {write:>7.2f} {write / normal:>5.2f} "
                  f"{lost:>6.2f}{waited}")
        mid = [s for s in r["saves"] if s.step + 1 in r["steps"]]
        if mid:
            sav = statistics.median(r["steps"][s.step + 1] for s in mid)
            flight = [r["steps"][k] for s in mid for k in r["in_flight"][s.step]]
            writes = [s.durable - (s.copied if s.copied is not None else s.begun) for s in r["saves"]]
            copies = [s.copy_s for s in r["saves"] if s.copy_s is not None]
            during = statistics.median(flight) if flight else 0.0
            print(f"  medians: saving step {sav:.2f} s (x{sav / normal:.2f}; stall {sav - normal:.2f} s"
                  + (f", host copy {statistics.median(copies):.2f} s" if copies else "") + ")"
                  + (f", steps during the write {during:.2f} s (x{during / normal:.2f}, {len(flight) / len(mid):.1f} "
                     "per save)" if flight else "")
                  + f", write {statistics.median(writes):.2f} s (x{statistics.median(writes) / normal:.2f})")
        logged = [(s.step, s.logged_write_s, s.mib) for s in r["saves"] if s.logged_write_s is not None]
        if logged:
            print("  as logged (durable T s, MiB): " + ", ".join(f"step {k}: {t:.1f} s, {mib:.1f} MiB"
                                                                    for k, t, mib in logged))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Part 1: bytes per rank and in total (tiny preset, 4 processes, (2,1,2) "
                                            "and (1,2,2)). Part 2: step time while a save is written (1 process, "
                                            "26.7M parameters). The module docstring says how each is measured.")
    parser.add_argument("--part", choices=["bytes", "stall", "all"], default="all", help="which part to run")
    parser.add_argument("--before", default=BEFORE_REF, metavar="REF",
                        help="the commit to measure as 'before' (default %(default)s: saves with universal/)")
    parser.add_argument("--no-before", action="store_true", help="measure the working tree only")
    parser.add_argument("--steps", type=int, default=40, help="part 2: training steps (default %(default)s)")
    parser.add_argument("--interval", type=int, default=8,
                        help="part 2: save every this many steps (default %(default)s)")
    parser.add_argument("--seq-len", type=int, default=64, help="part 2: tokens per step (default %(default)s)")
    parser.add_argument("--keep", metavar="DIR", help="run in DIR and keep the runs (default: a temporary directory)")
    args = parser.parse_args(argv)

    import deepspeed
    import torch

    started = time.monotonic()
    print(f"{time.strftime('%Y-%m-%d')} | {os.cpu_count()} CPUs | torch {torch.__version__}, deepspeed "
          f"{deepspeed.__version__}, Python {sys.version.split()[0]} | before: {args.before}"
          f"{' (skipped)' if args.no_before else ''}, after: the working tree", flush=True)
    with tempfile.TemporaryDirectory(prefix="checkpoint_io-") as scratch:
        tmp = Path(args.keep) if args.keep else Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        data = stdlib_shards(tmp)
        after = after_code()
        before = None if args.no_before else before_code(args.before, Path(tempfile.mkdtemp(dir=tmp)))
        if args.part in ("bytes", "all"):
            bytes_part(before, after, data, tmp)
        if args.part in ("stall", "all"):
            stall_part(before, after, data, tmp, args.steps, args.interval, args.seq_len)
    print(f"\n{time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
