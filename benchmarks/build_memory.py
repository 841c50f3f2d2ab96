"""Host memory of building one rank's model, measured: the model is built on the meta device, sliced, and only
this rank's slices are given memory and values (pretrain/build.py), so the peak should be the rank's slice plus
one full parameter (each is generated whole, then cut), never the whole model.

    .venv/bin/python benchmarks/build_memory.py configs/models/llama3-70b.yaml configs/llama3-70b-16x8.yaml --rank 0

This process runs as rank R of the config's world (launch.nodes x launch.procs_per_node) on torch's fake
process group (pretrain/simulate.py) and calls the trainer's own `build_model` on the CPU. It prints the
bytes the rank holds (fp32, as built), the largest full parameter, the whole model, and the peak resident
memory the build added (the peak, VmHWM, less the resident memory before it). Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from foundry.pretrain.build import build_model, model_options
from foundry.pretrain.config import RunConfig, check_world_size, load_config
from foundry.pretrain.model import Llama, num_parameters
from foundry.parallel.layout import Layout
from foundry.parallel.tensor import shard_of
from foundry.parallel.topology import Topology
from foundry.pretrain.simulate import GIB, coordinates, fake_world


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def resident_bytes() -> int:
    """This process's resident memory now (VmRSS)."""
    return _status("VmRSS")


def reset_peak_resident() -> None:
    """Start counting the peak resident memory afresh from now (Linux: "5" to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_resident_bytes() -> int:
    """The most this process has held resident since it started or since `reset_peak_resident` (VmHWM; not
    getrusage's ru_maxrss, which a process inherits from its parent across fork and exec)."""
    return _status("VmHWM")


def build_rank(files: list[str], overrides: list[str], rank: int) -> Llama:
    """`rank`'s model under the config `files` + `overrides`, built in this process as the trainer builds it."""
    return _build(files, overrides, rank)[0]


def measure(files: list[str], overrides: list[str], rank: int) -> dict:
    """Bytes of building `rank`'s model under the config `files` + `overrides`, measured in this process."""
    model, cfg, info, added = _build(files, overrides, rank)
    held = {id(p): p for p in model.parameters() if not p.is_meta}
    full = [torch.Size(shard_of(p).full_shape).numel() for p in model.parameters()]
    return {
        **info,
        "held_bytes": sum(p.numel() * p.element_size() for p in held.values()),
        "largest_full_parameter_bytes": max(full) * 4,
        "whole_model_bytes": num_parameters(cfg.model) * 4,
        "peak_added_bytes": added,
    }


def _build(files: list[str], overrides: list[str], rank: int) -> tuple[Llama, RunConfig, dict, int]:
    cfg = load_config(files, overrides)
    world = cfg.launch.world_size
    layout = Layout.from_config(cfg.parallel, cfg.model, world)
    check_world_size(cfg.train, layout.dp)
    with fake_world(rank, world):
        topology = Topology(layout)
        options = model_options(cfg.kernels, cfg.parallel, layout, document_end=None)
        before = resident_bytes()
        reset_peak_resident()
        model, _, _ = build_model(cfg.model, cfg.parallel, options, topology, torch.device("cpu"), seed=cfg.train.seed,
                                  seq_len=cfg.data.seq_len, init_from=cfg.checkpoint.init_from)
        added = peak_resident_bytes() - before
        info = {"layout": str(layout), "world": world, "rank": rank, **coordinates(topology)}
    return model, cfg, info, added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="+", help="YAML files, then key=value overrides")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = parser.parse_args()
    files = [a for a in args.config if "=" not in a]
    overrides = [a for a in args.config if "=" in a]
    r = measure(files, overrides, args.rank)
    if args.json:
        print(json.dumps(r))
        return
    bound = r["held_bytes"] + r["largest_full_parameter_bytes"] + 2 * GIB
    print(f"rank {r['rank']} of {r['world']} ({r['layout']}; tp {r['tp']}, pp {r['pp']}, dp {r['dp']}), fp32 on CPU")
    for label, key in (("slice held", "held_bytes"), ("largest full parameter", "largest_full_parameter_bytes"),
                       ("whole model", "whole_model_bytes"), ("peak resident added by the build", "peak_added_bytes")):
        print(f"  {label:<34}{r[key] / GIB:>9.2f} GiB")
    print(f"  bound: slice + largest + 2 GiB  {bound / GIB:>9.2f} GiB -> {'within' if r['peak_added_bytes'] <= bound else 'OVER'}")
    sys.exit(0 if r["peak_added_bytes"] <= bound else 1)


if __name__ == "__main__":
    main()
