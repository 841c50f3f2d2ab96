"""The training loop: build this rank's part of the run, resume it, then step.

Launch with torchrun (one process per device), e.g. 2 CPU processes:

    torchrun --standalone --nproc-per-node 2 -m foundry.launch.cli train configs/models/tiny.yaml configs/quickstart.yaml

Each concern of the loop is a component in its own module: the batches and data position
(batches.py), checkpoints (checkpointer.py), evaluation (evaluate.py), what is reported and
recorded (reporter.py), the bad-step guard (guard.py), stop signals (stop.py) and the hang
watchdog (watchdog.py). Rank 0 writes the resolved config (`config.yaml`) and one JSON line per
logged step (`metrics.jsonl`) into `train.run_dir`; checkpoints go to `run_dir/checkpoints`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

import torch
import torch.distributed as dist

from foundry.pretrain.batches import Batches
from foundry.pretrain.build import Run, finish, start
from foundry.pretrain.checkpoint import SaveError, tag_for
from foundry.pretrain.checkpointer import Checkpointer
from foundry.pretrain.config import RunConfig
from foundry.pretrain.evaluate import Evaluator, report
from foundry.pretrain.guard import StepGuard, TooManyBadSteps
from foundry.pretrain.preflight import validation_sets
from foundry.pretrain.reporter import Reporter
from foundry.pretrain.stop import StopRequest
from foundry.pretrain.watchdog import Watchdog


def train(cfg: RunConfig) -> None:
    """`foundry train` on this rank: resume, step to train.max_steps or a stop signal, save, report."""
    run = start(cfg)
    guard = StepGuard.attach_to(run.engine, cfg.train, pipeline=run.layout.pp > 1)  # patches the engine
    batches = Batches(run, cfg.data, seed=cfg.train.seed, micro_batch=cfg.train.micro_batch_size)
    checkpointer = Checkpointer(run, cfg.checkpoint, cfg.model, cfg.parallel.zero_stage,
                                components={"data": batches, "guard": guard})
    start_step = checkpointer.resume()  # the step the run continues after: 0 when it starts fresh
    evaluator = validation(cfg, run)
    reporter = Reporter(run, cfg.tracking, cfg.train.max_steps, start_step, checkpointer.resumed_from,
                        evaluates=bool(evaluator.sets))
    stop = StopRequest()
    watchdog = Watchdog.for_rank(cfg.train.step_timeout_seconds, run.run_dir)
    step = start_step  # the last step done, as the ways out below report it
    stopped_by = None

    def saving(verb: str, step: int) -> AbstractContextManager[None]:
        """A save, which the watchdog times on its own limit rather than as a step."""
        return watchdog.busy(f"{verb} checkpoint {tag_for(step)}", cfg.checkpoint.timeout_seconds,
                             "checkpoint.timeout_seconds")

    try:
        for step in range(start_step + 1, cfg.train.max_steps + 1):
            loss = train_step(run, batches, guard)
            try:
                guard.record(step, loss.item(), run.engine.was_step_applied(), batches.describe(step))
            except TooManyBadSteps:
                with saving("saving", step):
                    checkpointer.save(step, reporter.notes())  # the last good weights; the data past the bad batches
                    checkpointer.wait()
                raise
            stopped_by = stop.agreed(run.device)
            last = step == cfg.train.max_steps or stopped_by is not None
            watchdog.beat(step)
            reporter.step(step, loss, guard.skipped, last)
            if evaluator.due(step, last):
                with watchdog.busy(f"evaluation at step {step}", cfg.eval.timeout_seconds, "eval.timeout_seconds"):
                    results = evaluator.run(run.engine, run.loss_fn)
                reporter.evaluated(step, results)
            if checkpointer.due(step, last):
                if checkpointer.writing is not None:  # the previous save's write, timed as itself
                    with saving("writing", checkpointer.writing):
                        checkpointer.wait()
                with saving("saving", step):
                    checkpointer.save(step, reporter.notes())  # the notes name the MLflow run a resume continues
            if stopped_by:
                break
        with saving("writing", checkpointer.writing or step):
            checkpointer.wait()  # the last save is on disk and marked complete
    except BaseException as e:
        if isinstance(e, TooManyBadSteps) or isinstance(e, SaveError) and not e.fatal:  # a relaunch meets them again
            reporter.failed(step, reason=str(e))
        else:
            watchdog.explain(e)  # a peer died or went silent: say which, from the watchdog's records
            reporter.crashed()
        raise
    finally:
        batches.close()
        watchdog.stop()
    reporter.finished(step, stopped_by)
    if cfg.checkpoint.save_consolidated and not stopped_by:
        checkpointer.save_consolidated()
    finish(run)


def train_step(run: Run, batches: Batches, guard: StepGuard) -> torch.Tensor:
    """One optimizer step over the global batch (skipped by DeepSpeed when `guard` poisons a micro-batch);
    returns its mean loss."""
    if run.layout.pp > 1:
        return run.engine.train_batch(data_iter=batches)  # 1F1B over grad_accum micro-batches; dp mean
    engine, loss_sum = run.engine, torch.zeros((), device=run.device)
    for _ in range(run.grad_accum):
        inputs, targets = next(batches)
        # loss_fn None: the model computes the loss from (inputs, targets) itself (chunked output layer).
        loss = engine(inputs, targets) if run.loss_fn is None else run.loss_fn(engine(inputs), targets)
        engine.backward(guard.check(loss))
        engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        loss_sum += loss.detach()
    dist.all_reduce(loss_sum, group=run.topology.get_data_parallel_group())
    return loss_sum / (run.grad_accum * run.layout.dp)


def evaluate_checkpoint(cfg: RunConfig, tag_dir: Path) -> dict[str, dict[str, float]]:
    """`foundry eval`: the validation loss of a saved checkpoint under this process's layout."""
    run = start(cfg)
    step = Checkpointer(run, cfg.checkpoint, cfg.model, cfg.parallel.zero_stage).load(tag_dir)["step"]
    results = validation(cfg, run).run(run.engine, run.loss_fn)
    report(step, results, None)
    finish(run)
    return results


def validation(cfg: RunConfig, run: Run) -> Evaluator:
    """The evaluator of the [eval] section's validation sets, in windows of data.seq_len."""
    return Evaluator(validation_sets(cfg), cfg.eval, cfg.data.seq_len, cfg.train.micro_batch_size, run.topology,
                     run.device)
