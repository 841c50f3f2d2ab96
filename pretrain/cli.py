"""The `foundry` command. Thin: parse the command line, load the config, call the work.

    foundry train configs/models/tiny.yaml configs/quickstart.yaml train.max_steps=50
    torchrun --standalone --nproc-per-node 2 -m pretrain.cli train configs/models/tiny.yaml configs/quickstart.yaml
"""

from __future__ import annotations

import argparse
import sys

from pretrain.config import ConfigError, load_config, reference


def _train(args: argparse.Namespace) -> None:
    files = [a for a in args.config if "=" not in a]
    overrides = [a for a in args.config if "=" in a]
    if not files:
        raise ConfigError("no config file given: pass at least one YAML file, e.g. configs/models/tiny.yaml")
    cfg = load_config(files, overrides)
    from pretrain.trainer import train  # heavy imports (DeepSpeed) only once the config is sound

    train(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foundry", description="Pretrain Llama models on DeepSpeed.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser(
        "train",
        help="train a model from YAML configs and key=value overrides",
        description="Train a model. YAML files merge left to right; key=value overrides win.",
        epilog="config keys:\n" + "\n".join(reference()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", nargs="+", metavar="CONFIG.yaml | key=value")
    train.set_defaults(run=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ConfigError as e:
        print(f"foundry: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
