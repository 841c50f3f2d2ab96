"""The training loop: build the model and engine from a validated config, then step.

Launch with torchrun (one process per device), e.g. 2 CPU processes:

    torchrun --standalone --nproc-per-node 2 -m foundry.launch.cli train configs/models/tiny.yaml configs/quickstart.yaml

Rank 0 writes the resolved config (`config.yaml`) and one JSON line per logged step
(`metrics.jsonl`) into `train.run_dir`; checkpoints go to `run_dir/checkpoints`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from foundry.data.stream import ShardLoader, merge_states
from foundry.parallel.consolidate import full_state_dict
from foundry.parallel.parallelize import parallelize
from foundry.parallel.topology import Layout, Topology
from foundry.pretrain import checkpoint, kernels
from foundry.pretrain import engine as ds_engine
from foundry.pretrain.config import RunConfig, public, to_yaml
from foundry.pretrain.convert import load_hf
from foundry.pretrain.flops import device_peak_flops, flops_per_token
from foundry.pretrain.generate import TOKENIZER
from foundry.pretrain.guard import StepGuard, TooManyBadSteps, attach
from foundry.pretrain.evaluate import Evaluator, report
from foundry.pretrain.metrics import StepLogger, drop_records_after, duration
from foundry.pretrain.model import Llama, num_parameters
from foundry.pretrain.preflight import preflight, validation_sets
from foundry.pretrain.stop import StopRequest, write_status
from foundry.pretrain.tracking import Tracker, flatten, git_commit
from foundry.pretrain.watchdog import Watchdog

log = logging.getLogger("foundry")


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup_logging(rank: int, run_dir: Path) -> None:
    """Every rank logs everything to RUN_DIR/logs/rankN.log; on the console non-zero ranks stay quiet unless
    something goes wrong."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    console = logging.StreamHandler()
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S",
                        handlers=[console, logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")], force=True)
    # Known noise that says nothing about the run: DeepSpeed asks its own scheduler for the lr before
    # step 1, and ZeRO calls a collective that torch has renamed.
    logging.getLogger("DeepSpeed").addFilter(lambda r: "before it has started" not in r.getMessage())
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated")


@dataclasses.dataclass
class Run:
    """This process's part of a run: the model on its DeepSpeed engine under the layout, and what the
    checkpoint it resumed from said (step, data position, bad-step history)."""

    cfg: RunConfig
    datasets: list
    layout: Layout
    grad_accum: int
    device: torch.device
    topology: Topology
    precision: str
    attention_path: str
    model: Llama
    engine: Any
    loss_fn: Any  # None: the model computes its own loss (chunked output layer)
    plain_names: dict[int, str]
    identity: dict[str, Any]  # what a checkpoint must match to load exactly
    start_step: int = 0
    data_state: dict | None = None
    guard_state: dict | None = None

    @property
    def universal(self) -> bool:
        """Checkpoints carry a layout-free copy (ZeRO 1 and 2), so other layouts can resume them."""
        return self.cfg.parallel.zero_stage in (1, 2)


def start(cfg: RunConfig) -> Run:
    """Check the config, join the process group, and build the model, sliced for this rank, on its engine."""
    datasets, layout, grad_accum = preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    device = pick_device()
    kernels.configure(cfg.kernels)
    ds_engine.init_distributed(device, cfg.train.collective_timeout_seconds)
    setup_logging(dist.get_rank(), Path(cfg.train.run_dir))
    topology = Topology(layout)
    precision = ds_engine.resolve_precision(cfg.train.precision, device)
    # Tensors like this run's activations decide the kernel paths.
    probe = torch.empty(1, 1, 1, 1, device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    attention_path = kernels.attention_path(probe)

    # The model: the same full model on every rank (seeded, or imported), then sliced.
    torch.manual_seed(cfg.train.seed)
    model = Llama(cfg.model)
    if cfg.checkpoint.init_from:
        model.load_state_dict(load_hf(Path(cfg.checkpoint.init_from))[1])
        log.info("initial weights from %s", cfg.checkpoint.init_from)
    model = model.to(device)
    module, loss_fn = parallelize(model, topology, cfg.parallel)
    plain_names = {id(p): n for n, p in model.named_parameters()}
    optimizer_path, optimizer_params = kernels.optimizer_params(cfg.kernels, device)
    if cfg.kernels.loss_chunk_tokens and layout.tp == 1 and layout.pp == 1:
        model.loss_chunk, loss_fn = cfg.kernels.loss_chunk_tokens, None  # the model computes its own loss
    if cfg.data.document_mask:
        model.document_end = datasets[0].manifest["tokenizer"]["eos_id"]  # every dataset has the same tokenizer
    if cfg.kernels.compile:
        for block in model.model.layers.values():
            block.compile()  # in place: parameter names, and so checkpoints, stay as they are
    log.info("kernels: attention %s%s | rmsnorm %s | loss %s | optimizer %s | torch.compile %s",
             attention_path, " with document masking" if cfg.data.document_mask else "", kernels.rmsnorm_path(probe),
             f"chunked, {model.loss_chunk} tokens" if model.loss_chunk else
             "vocab-parallel" if layout.tp > 1 else "whole logits", optimizer_path,
             "blocks" if cfg.kernels.compile else "off")
    ds_config = ds_engine.deepspeed_config(cfg.train, cfg.parallel, grad_accum, precision, optimizer_params)
    engine = ds_engine.initialize(module, ds_config, mpu=None if layout.pp > 1 else topology)
    attach(engine)

    t = cfg.train
    log.info(
        "layout: world %d = %s | ZeRO-%d | %s on %s | global batch %d = micro %d x accum %d x dp %d | seq %d",
        dist.get_world_size(), layout, cfg.parallel.zero_stage, precision, device.type, t.global_batch_size,
        t.micro_batch_size, grad_accum, layout.dp, cfg.data.seq_len,
    )
    peak = device_peak_flops(device)
    log.info(
        "model: %.2fM params (%.2fM non-embedding) | %.3g FLOP/token | peak %s",
        num_parameters(cfg.model) / 1e6, num_parameters(cfg.model, embedding=False) / 1e6,
        flops_per_token(cfg.model, cfg.data.seq_len),
        f"{peak / 1e12:.0f} TFLOP/s per device" if peak else "n/a (no bf16 peak known for this device): MFU n/a",
    )
    # What a checkpoint must match to be loaded exactly (as it reads back from JSON).
    identity = json.loads(json.dumps({"model": dataclasses.asdict(cfg.model), "layout": dataclasses.asdict(layout),
                                      "zero_stage": cfg.parallel.zero_stage}))
    return Run(cfg, datasets, layout, grad_accum, device, topology, precision, attention_path, model, engine,
               loss_fn, plain_names, identity)


def restore(run: Run, tag_dir: Path) -> None:
    """Load a complete checkpoint into `run` (another layout's through its layout-free copy)."""
    def reshard(tag_dir: Path) -> None:
        checkpoint.load_universal(run.engine, tag_dir, run.plain_names, run.topology.tp_rank, run.layout.tp,
                                  int(tag_dir.name.removeprefix("step")), run.cfg.model.vocab_size)

    client_state = checkpoint.load(run.engine, tag_dir.parent, tag_dir.name, run.identity,
                                   reshard if run.universal else None)
    run.start_step, run.data_state = client_state["step"], client_state["data"]
    run.guard_state = client_state.get("guard")
    log.info("resumed from %s at step %d (%.1fM tokens seen)", tag_dir, run.start_step, client_state["tokens"] / 1e6)


def finish(run: Run) -> None:
    # Free the engine before tearing down gloo: a live engine at exit sometimes aborts the worker.
    run.engine = run.model = None
    dist.barrier(device_ids=[run.device.index] if run.device.type == "cuda" else None)
    dist.destroy_process_group()


def evaluate_checkpoint(cfg: RunConfig, tag_dir: Path) -> dict[str, dict[str, float]]:
    """`foundry eval`: the validation loss of a saved checkpoint under this process's layout."""
    run = start(cfg)
    restore(run, tag_dir)
    sets = validation_sets(cfg)
    evaluator = Evaluator(sets, cfg.data.seq_len, cfg.eval.tokens, cfg.train.micro_batch_size, run.topology, run.device)
    results = evaluator.run(run.engine, run.loss_fn)
    report(run.start_step, results, None)
    finish(run)
    return results


def train(cfg: RunConfig) -> None:
    run = start(cfg)
    engine, topology, layout, device, model = run.engine, run.topology, run.layout, run.device, run.model
    rank = dist.get_rank()
    t, d, seq_len = cfg.train, cfg.data, cfg.data.seq_len
    run_dir = Path(t.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    pipelined = layout.pp > 1
    tag = checkpoint.find_latest(ckpt_dir) if cfg.checkpoint.resume else None  # the checkpoint to resume from
    tracker = None
    if rank == 0:
        # Atomically: under `foundry launch` every rank is reading this very file at start-up.
        checkpoint.write_atomic(run_dir / "config.yaml", to_yaml(cfg))
        log.info("resolved config:\n%s", to_yaml(cfg).rstrip())
        log.info("logs of every rank: %s", run_dir / "logs")
        if cfg.tracking.mlflow:
            tracker = _start_tracking(cfg, layout, run.precision, device, run.attention_path,
                                      ckpt_dir / tag if tag else None)
    if tag is not None:
        restore(run, ckpt_dir / tag)
    start_step = run.start_step
    loss_fn = run.loss_fn
    evaluator = Evaluator(validation_sets(cfg), seq_len, cfg.eval.tokens, t.micro_batch_size, topology,
                          device) if cfg.eval.datasets else None

    # Tensor-parallel peers read the same batches: the data split is by data-parallel rank only.
    # Middle pipeline stages never ask for a batch, so they read nothing.
    loader = ShardLoader(
        run.datasets, seq_len=seq_len, micro_batch=t.micro_batch_size, seed=t.seed, streams=d.streams,
        workers=d.workers, dp_rank=topology.dp_rank, dp_size=layout.dp, shuffle=d.shuffle, on_error=d.on_error,
        state=run.data_state,
    )
    log.info("data: %s | %.1fM tokens | %d streams, %d per rank, %d workers",
             ", ".join(f"{ds.name} x {ds.weight:g}" for ds in run.datasets),
             sum(ds.manifest["total_tokens"] for ds in run.datasets) / 1e6, d.streams, d.streams // layout.dp, d.workers)
    batches = ((b[:, :-1].to(device), b[:, 1:].to(device)) for b in loader)
    guard = StepGuard(t.spike_factor, t.spike_window, t.max_skipped_in_row, run.guard_state)
    if pipelined:
        engine.module.loss_fn = guard.wrap(engine.module.loss_fn)  # the last stage's loss, per micro-batch

    tokens_per_step = t.global_batch_size * seq_len
    metrics = StepLogger(run_dir / "metrics.jsonl" if rank == 0 else None, start_step=start_step, max_steps=t.max_steps,
                         interval=cfg.tracking.log_interval, tokens_per_step=tokens_per_step,
                         flops_per_token=flops_per_token(cfg.model, seq_len), peak_flops=device_peak_flops(device),
                         devices=dist.get_world_size(), device=device)
    if rank == 0 and evaluator:
        drop_records_after(run_dir / "eval.jsonl", start_step)
    stop = StopRequest()
    watchdog = Watchdog(dist.distributed_c10d._get_default_store(), rank, dist.get_world_size(),  # torchrun's store
                        t.step_timeout_seconds, (run_dir / "logs" / f"rank{rank}.log").open("a")) \
        if t.step_timeout_seconds else None
    if rank == 0:
        write_status(run_dir, "running", start_step, t.max_steps)
    def save(step: int) -> None:
        """Every rank calls. A failed save raises SaveError on every rank unless the config says to train on."""
        states: list[dict | None] = [None] * layout.dp
        dist.all_gather_object(states, loader.state_dict(), group=topology.get_data_parallel_group())
        client_state = {"step": step, "tokens": step * tokens_per_step, "data": merge_states(states),
                        "guard": guard.state_dict(), "config": to_yaml(cfg)}
        checkpoint.save(engine, ckpt_dir, step, client_state, run.identity, cfg.checkpoint.keep, also=also,
                        notes={"mlflow_run_id": tracker.run_id} if tracker else None)

    first = run.datasets[0]
    tokenizer = (Path(first.name) if Path(first.name).is_dir() else Path(first.name).parent) / \
        first.manifest["tokenizer"]["file"]

    def also(tag_dir: Path) -> None:
        """What a checkpoint holds besides DeepSpeed's files: the layout-free copy, and the tokenizer (so that
        `foundry generate` needs nothing else)."""
        if run.universal:
            checkpoint.save_universal(engine, tag_dir, run.plain_names, topology.tp_rank, topology.pp_rank,
                                      topology.dp_rank, engine.lr_scheduler.state_dict())
        if rank == 0:
            shutil.copyfile(tokenizer, tag_dir / TOKENIZER)

    def save_or_go_on(step: int) -> None:
        try:
            save(step)
        except checkpoint.SaveError as e:
            if not cfg.checkpoint.continue_on_save_error:
                raise
            log.error("%s; training on (checkpoint.continue_on_save_error=true)", str(e).split("; free space")[0])

    run_start, step, stopped_by = time.perf_counter(), start_step, None
    try:
        for step in range(start_step + 1, t.max_steps + 1):
            if pipelined:
                loss = engine.train_batch(data_iter=batches)  # 1F1B over grad_accum micro-batches; dp mean
            else:
                loss = _train_step(engine, batches, loss_fn, run.grad_accum, topology, guard)
            try:
                guard.record(step, loss.item(), engine.was_step_applied(),
                             f"global batch {step} of the data order (train.seed={t.seed}), tokens "
                             f"{(step - 1) * tokens_per_step}-{step * tokens_per_step - 1} of the run")
            except TooManyBadSteps:
                save_or_go_on(step)  # the weights of the last good step, and the data after the bad batches
                raise
            stopped_by = stop.agreed(device)
            if watchdog:
                watchdog.beat(step)
            record = metrics.step(step, loss, engine, skipped=guard.skipped, last=bool(stopped_by))
            if tracker and record:
                tracker.log(record)
            if evaluator and (step == t.max_steps or stopped_by or (cfg.eval.interval and step % cfg.eval.interval == 0)):
                results = evaluator.run(engine, loss_fn)
                report(step, results, run_dir / "eval.jsonl" if rank == 0 else None)
                if tracker:
                    tracker.log_values(step, {f"val_{key}/{name}": r[key] for name, r in results.items()
                                              for key in ("loss", "ppl")})
            if step == t.max_steps or stopped_by or (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0):
                save_or_go_on(step)
            if stopped_by:
                log.info("stopped by %s after step %d of %d; the run resumes from %s", stopped_by, step,
                         t.max_steps, ckpt_dir / checkpoint.tag_for(step))
                break
    except (TooManyBadSteps, checkpoint.SaveError) as e:  # a relaunch would meet them again
        if rank == 0:
            write_status(run_dir, "failed", step, t.max_steps, reason=str(e))
        if tracker:
            tracker.close("FAILED")
        raise
    except BaseException as e:
        if _collective_failed(e):  # a peer died or went silent: say which, from the watchdog's records
            log.error("a collective failed (%s); %s", (str(e).strip().splitlines() or [""])[0][:300],
                      watchdog.culprits() if watchdog else "no watchdog records (train.step_timeout_seconds=0)")
        if tracker:
            tracker.close("FAILED")
        raise
    finally:
        loader.close()
        if watchdog:
            watchdog.stop()

    if metrics.first is not None:
        log.info("%s: steps %d-%d in %s | loss %.4f -> %.4f", "stopped" if stopped_by else "done", start_step + 1,
                 step, duration(time.perf_counter() - run_start), metrics.first["loss"], metrics.last["loss"])
    if rank == 0:
        write_status(run_dir, "stopped" if stopped_by else "finished", step, t.max_steps, stopped_by)
    if tracker:
        tracker.close("KILLED" if stopped_by else "FINISHED")
    if cfg.checkpoint.save_consolidated and not stopped_by:
        full = full_state_dict(engine.module, run.plain_names, topology, cfg.model.vocab_size, cfg.model.tie_embeddings)
        if rank == 0:
            torch.save(full, run_dir / "model.pt")
            log.info("wrote the unsharded fp32 model to %s", run_dir / "model.pt")
    del engine, model
    finish(run)


def _collective_failed(e: BaseException) -> bool:
    """A collective that timed out or lost its peer (gloo reports these as plain RuntimeErrors)."""
    return isinstance(e, dist.DistError) or isinstance(e, RuntimeError) and any(
        word in str(e) for word in ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer"))


def _start_tracking(cfg: RunConfig, layout: Layout, precision: str, device: torch.device, attention_path: str,
                    resume_from: Path | None) -> Tracker:
    """The run's MLflow run: the one the checkpoint we resume from names, else a new one."""
    run_id = checkpoint.read_notes(resume_from).get("mlflow_run_id") if resume_from else None
    tags = {
        "git.commit": git_commit(), "layout": str(layout), "zero_stage": str(cfg.parallel.zero_stage),
        "world_size": str(dist.get_world_size()), "precision": precision, "kernel.attention": attention_path,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "slurm.job_id": os.environ.get("SLURM_JOB_ID", "none"),
    }
    return Tracker(cfg.tracking, Path(cfg.train.run_dir), run_id=run_id, params=flatten(dataclasses.asdict(public(cfg))),
                   tags=tags, config_yaml=to_yaml(cfg))


def _train_step(engine, batches, loss_fn, grad_accum: int, topology: Topology, guard: StepGuard) -> torch.Tensor:
    """One optimizer step (skipped by DeepSpeed when `guard` poisons a micro-batch); returns the mean loss over
    the global batch. loss_fn None: the model computes the loss from (inputs, targets) itself (chunked output)."""
    loss_sum = torch.zeros((), device=engine.device)
    for _ in range(grad_accum):
        inputs, targets = next(batches)
        loss = engine(inputs, targets) if loss_fn is None else loss_fn(engine(inputs), targets)
        engine.backward(guard.check(loss))
        engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        loss_sum += loss.detach()
    dist.all_reduce(loss_sum, group=topology.get_data_parallel_group())
    return loss_sum / (grad_accum * topology.layout.dp)


