"""The `foundry` command. Thin: parse the command line, load the config, call the work.

    foundry train configs/models/tiny.yaml configs/quickstart.yaml train.max_steps=50
    torchrun --standalone --nproc-per-node 2 -m foundry.launch.cli train configs/models/tiny.yaml configs/quickstart.yaml
    foundry plan configs/models/llama3-8b.yaml --gpus 8 --gpu-memory-gib 80
    foundry simulate configs/models/llama3-70b.yaml configs/llama3-70b-16x8.yaml --rank 0
    foundry prepare-data corpus/ --pattern '**/*.jsonl.zst' --tokenizer llama3/tokenizer.json --out data/web
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

# Only what parsing the command line needs is imported here, so `foundry --help` answers at once; the work
# (torch, DeepSpeed) is imported by the command that needs it.
from foundry.data.prepare import PrepareOptions
from foundry.pretrain.config import ConfigError, RunConfig, load_config, load_model_config, reference, to_yaml


def _load(config: list[str]) -> RunConfig:
    files = [a for a in config if "=" not in a]
    overrides = [a for a in config if "=" in a]
    if not files:
        raise ConfigError("no config file given: pass at least one YAML file, e.g. configs/models/tiny.yaml")
    return load_config(files, overrides)


def _train(args: argparse.Namespace) -> None:
    cfg = _load(args.config)
    from foundry.pretrain.trainer import train  # heavy imports (DeepSpeed) only once the config is sound

    train(cfg)


def _checkpoint_dir(path: str) -> Path:
    """A checkpoint directory given on the command line, or a run directory (its newest complete checkpoint)."""
    from foundry.pretrain.checkpoint import CheckpointError, find_latest

    given = Path(path)
    if (given / "checkpoints").is_dir():
        tag = find_latest(given / "checkpoints")
        if tag is None:
            raise CheckpointError(f"{given} has no complete checkpoint yet: name a checkpoint directory instead")
        return given / "checkpoints" / tag
    if not given.is_dir():
        raise CheckpointError(f"{given} is neither a checkpoint nor a run directory: e.g. runs/quickstart or "
                              f"runs/quickstart/checkpoints/step00000300")
    return given


def _eval(args: argparse.Namespace) -> None:
    tag_dir = _checkpoint_dir(args.checkpoint)
    run_config = tag_dir.parent.parent / "config.yaml"
    if not run_config.is_file():
        raise ConfigError(f"{run_config} is missing: `foundry eval` reads the run's resolved config from there")
    # The run's own config, with its checkpoints left alone and the layout (and eval keys) from the command line.
    cfg = load_config([str(run_config)], ["checkpoint.resume=false", "tracking.mlflow=false", *args.overrides])
    if not cfg.eval.datasets:
        raise ConfigError("the run has no validation sets: add eval.datasets='[DIR]' to the command line")
    from foundry.pretrain.trainer import evaluate_checkpoint

    results = evaluate_checkpoint(cfg, tag_dir)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({"checkpoint": str(tag_dir), "sets": results}))  # for scripts; the log line is for people


def _generate(args: argparse.Namespace) -> None:
    import torch

    from foundry.data.tokenizer import eos_id
    from foundry.pretrain.generate import generate, load_for_generation

    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ConfigError("--max-new-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = load_for_generation(_checkpoint_dir(args.checkpoint), device)
    eos = eos_id(tokenizer)
    for prompt in args.prompt:
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        new = generate(model, ids, args.max_new_tokens, args.temperature, args.top_p, stop=eos, seed=args.seed)
        print(f"--- {prompt!r} ->\n{prompt}{tokenizer.decode(new)}")


def _launch(args: argparse.Namespace) -> int:
    import logging

    from foundry.launch import slurm
    from foundry.launch.status import describe
    from foundry.launch.torchrun import check_endpoint, run_local
    from foundry.pretrain.checkpoint import write_atomic
    from foundry.pretrain.preflight import preflight
    from foundry.pretrain.tracking import credentials_to_env

    if args.mode == "requeue":
        return slurm.requeue_if_stopped(Path(args.config[0]))
    if args.mode == "status":
        try:
            print("\n".join(describe(Path(args.config[0]))))
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s foundry launch: %(message)s", datefmt="%H:%M:%S")
    cfg = _load(args.config)
    if args.mode == "node":  # inside the SLURM job: submitted, checked and written already
        slurm.run_node(cfg, Path(args.config[0]))
    if args.mode == "local":
        check_endpoint(cfg.launch)
    preflight(cfg, cfg.launch.world_size)  # the job's world size must fit the config
    run_dir = Path(cfg.train.run_dir)
    config_path = run_dir / "config.yaml"  # what the job trains: the config as resolved and checked now
    if not args.dry_run:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(config_path, to_yaml(cfg))  # several nodes' launchers may write it at once
    credentials_to_env(cfg.tracking.uri)  # the job's processes inherit the password; config.yaml has ***
    if args.mode == "local":
        return run_local(cfg.launch, config_path, run_dir, dry_run=args.dry_run)
    return slurm.launch(cfg, config_path, dry_run=args.dry_run)


def _plan(args: argparse.Namespace) -> None:
    from foundry.parallel.planner import format_plan, plan

    cfg = load_model_config(args.model)
    print(format_plan(plan(cfg, args.gpus, args.gpu_memory_gib, args.seq_len, args.precision, args.global_batch,
                           model_name=Path(args.model).stem)))


def _simulate(args: argparse.Namespace) -> None:
    cfg = _load(args.config)
    from foundry.pretrain.simulate import default_ranks, format_report, simulate

    for rank in args.rank or default_ranks(cfg):
        print(format_report(simulate(cfg, rank)), flush=True)


def _prepare_data(args: argparse.Namespace) -> None:
    import logging

    from foundry.data.prepare import prepare

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.workers < 1 or args.sample_tokens < 1 or args.shard_tokens < 1 or args.vocab_size < 257 \
            or not 0 <= args.holdout < 1:
        raise ConfigError("--workers, --sample-tokens and --shard-tokens must be >= 1, --vocab-size >= 257 and "
                          "--holdout in [0, 1)")
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(PrepareOptions)}
    prepare(args.inputs, PrepareOptions(**{**options, "exclude": tuple(options["exclude"])}))


def _convert(args: argparse.Namespace) -> None:
    import torch
    from omegaconf import OmegaConf

    from foundry.pretrain.convert import load_hf, save_hf

    src, out = Path(args.source), Path(args.out)
    if args.direction == "import":
        cfg, _ = load_hf(src)  # reads every weight file: a broken download fails here, not in training
        OmegaConf.save(OmegaConf.create({"model": OmegaConf.structured(cfg)}), out)
        print(f"wrote {out}: train with it and checkpoint.init_from={src}")
        return
    from foundry.data.stream import open_dataset
    from foundry.pretrain.checkpoint import find_latest, verify
    from foundry.pretrain.reshard import full_weights

    model = load_model_config(str(src / "config.yaml"))
    if (src / "model.pt").is_file():  # written at the end with checkpoint.save_consolidated=true
        weights = torch.load(src / "model.pt", weights_only=True)
    else:  # the newest complete checkpoint, whatever layout wrote it
        tag = find_latest(src / "checkpoints")
        if tag is None:
            raise ConfigError(f"{src} has neither model.pt nor a complete checkpoint: point at a run directory")
        info = verify(src / "checkpoints" / tag, {})
        weights = full_weights(src / "checkpoints" / tag, info, model.vocab_size, model.tie_embeddings)
    datasets = OmegaConf.load(src / "config.yaml").data.datasets
    tokenizer = open_dataset(datasets[0].path).tokenizer_file if datasets else None
    save_hf(weights, model, out, tokenizer)
    print(f"wrote {out}")


def _command(commands: Any, name: str, run: Callable[[argparse.Namespace], Any], **parser: Any) -> argparse.ArgumentParser:
    command = commands.add_parser(name, **parser)
    command.set_defaults(run=run)
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foundry", description="Pretrain Llama models on DeepSpeed.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = _command(commands, "train", _train,
        help="train a model from YAML configs and key=value overrides",
        description="Train a model. YAML files merge left to right; key=value overrides win.",
        epilog="config keys:\n" + "\n".join(reference()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", nargs="+", metavar="CONFIG.yaml | key=value")
    evaluate = _command(commands, "eval", _eval,
        help="validation loss and perplexity of a checkpoint, under any layout (run it with torchrun)",
        description="Score a checkpoint (or a run directory's newest) on the run's validation sets, e.g. "
        "`torchrun --nproc-per-node 2 -m foundry.launch.cli eval runs/quickstart parallel.tensor=2`. Overrides may set "
        "the layout and the eval keys; the rest is the run's config.",
    )
    evaluate.add_argument("checkpoint", metavar="CHECKPOINT | RUN_DIR")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value")
    gen = _command(commands, "generate", _generate,
        help="text from a checkpoint: greedy or sampled, with a KV cache",
        description="Continue each --prompt with the checkpoint's model and tokenizer (one process, CPU or GPU). "
        "Reads a checkpoint of any layout, ZeRO 1-3.",
    )
    gen.add_argument("checkpoint", metavar="CHECKPOINT | RUN_DIR")
    gen.add_argument("--prompt", action="append", required=True, help="text to continue (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); else sample")
    gen.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens with this "
                                                                "much probability (default 1: all)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when there is a GPU")
    launch = _command(commands, "launch", _launch,
        help="run training on this node with torchrun, or as a SLURM batch job; show a run's status",
        description="local CONFIG...: torchrun on this node (with launch.nodes > 1, run the same command on every "
        "node), relaunching a failed job launch.max_restarts times. slurm CONFIG...: check the cluster, write "
        "RUN_DIR/job.sbatch and submit it (--dry-run: print it). status RUN_DIR: the job, its state and the "
        "last logged step. node CONFIG...: the batch script's srun line on each node (derive and log the node's "
        "address and interface, then run torchrun). requeue RUN_DIR: the batch script's last line. Keys: [launch] in "
        "`foundry train --help`.",
    )
    launch.add_argument("mode", choices=["local", "slurm", "status", "requeue", "node"])
    launch.add_argument("config", nargs="+", metavar="CONFIG.yaml | key=value | RUN_DIR")
    launch.add_argument("--dry-run", action="store_true", help="print the torchrun command or sbatch script only")
    prep = _command(commands, "prepare-data", _prepare_data,
        help="tokenize raw text into webdataset token shards with a manifest",
        description="Tokenize .txt / .jsonl files (optionally .gz or .zst), directories or globs into tar shards "
        "of token ids plus manifest.json, using every worker given.",
    )
    prep.add_argument("inputs", nargs="+", metavar="INPUT", help="files, directories or globs")
    for f in dataclasses.fields(PrepareOptions):
        shown = "" if f.default in (None, ()) or "default" in f.metadata["help"] else f" (default {f.default})"
        default = list(f.default) if f.metadata["argparse"].get("action") == "append" else f.default
        prep.add_argument(f"--{f.name.replace('_', '-')}", default=default, help=f.metadata["help"] + shown,
                          **f.metadata["argparse"])
    convert = _command(commands, "convert", _convert,
        help="export a run's model to a Hugging Face Llama directory, or import one",
        description="export RUN_DIR --out HF_DIR: the run's model (run_dir/model.pt, else the newest complete "
        "checkpoint of any layout) as config.json + safetensors + tokenizer.json. import HF_DIR --out MODEL.yaml: the model section matching a Hugging Face "
        "Llama directory, to train from it with checkpoint.init_from=HF_DIR under any layout.",
    )
    convert.add_argument("direction", choices=["export", "import"])
    convert.add_argument("source", metavar="RUN_DIR | HF_DIR")
    convert.add_argument("--out", required=True, metavar="HF_DIR | MODEL.yaml")
    plan = _command(commands, "plan", _plan,
        help="estimate memory per GPU of every layout (tp, pp, dp, ZeRO, micro-batch, recomputation) and pick one",
        description="List the layouts of a model that fit N GPUs of G GiB each, with their estimated memory per "
        "GPU (parallel/planner.py documents the model and its sources), and pick one by a stated rule.",
    )
    plan.add_argument("model", metavar="MODEL.yaml", help="a model preset, e.g. configs/models/llama3-8b.yaml")
    plan.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    plan.add_argument("--gpu-memory-gib", type=float, required=True, help="memory of one GPU in GiB, e.g. 80")
    plan.add_argument("--seq-len", type=int, help="tokens per sequence (default: model.max_seq_len, at most 8192)")
    plan.add_argument("--global-batch", type=int, help="sequences per optimizer step; micro x dp must divide it")
    plan.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                      help="bf16 with fp32 master weights (GPU default) or fp32")
    sim = _command(commands, "simulate", _simulate,
        help="run one rank of the configured cluster job in this process and compare its memory with the plan",
        description="Run what rank R of the configured world (launch.nodes x launch.procs_per_node GPUs) does up "
        "to its first optimizer steps, in this one process on torch's fake process group (collectives move "
        "nothing; shapes, memory and code paths are the real rank's), and print its coordinates, parameters "
        "and bytes (parameters, gradients, optimizer state, activations, DeepSpeed's buffers) next to "
        "`foundry plan`'s estimate. A rank too big for this machine is built with fake tensors and its bytes "
        "counted, not allocated (pretrain/simulate.py says how each figure is known).",
    )
    sim.add_argument("config", nargs="+", metavar="CONFIG.yaml | key=value")
    sim.add_argument("--rank", type=int, action="append",
                     help="a global rank (repeatable; default: the first rank of the first, a middle and the last "
                          "pipeline stage)")
    return parser


# The errors a user can cause or meet, each printed as one line (no traceback) with its exit code: (module,
# exception classes in it, what to call it, exit code). An exception can only come from a module that was
# imported, so they are looked up in sys.modules rather than imported here: `foundry plan` or `launch
# status` never pay for importing torch just to name an error they cannot raise.
EXPECTED_ERRORS = (
    ("foundry.pretrain.config", ("ConfigError",), "config error", 2),
    ("foundry.parallel.layout", ("LayoutError",), "config error", 2),
    ("foundry.data.tokenizer", ("DataError",), "data error", 2),
    ("foundry.pretrain.checkpoint", ("CheckpointError",), "checkpoint error", 2),
    ("foundry.launch.slurm", ("LaunchError",), "launch error", 2),
    ("foundry.launch.network", ("NetworkError",), "launch error", 2),
    ("foundry.pretrain.checkpoint", ("SaveError",), "run stopped", 1),
    ("foundry.pretrain.guard", ("TooManyBadSteps",), "run stopped", 1),
)


def _expected(e: Exception) -> tuple[str, int] | None:
    for module, names, what, exit_code in EXPECTED_ERRORS:
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(e, tuple(getattr(loaded, name) for name in names)):
            return what, exit_code
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.run(args)
    except Exception as e:
        expected = _expected(e)
        if expected is None:
            raise
        print(f"foundry: {expected[0]}: {e}", file=sys.stderr)
        return expected[1]
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
