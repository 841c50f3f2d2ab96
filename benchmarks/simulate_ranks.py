"""Simulated ranks of the example cluster jobs next to the planner, one table (`foundry simulate` on each).

    .venv/bin/python benchmarks/simulate_ranks.py        # about a minute on 2 cores

For llama3-8b on 8 and 16 GPUs (configs/llama3-8b-2x8.yaml, tp 2 x pp 4) and llama3-70b on 128
(configs/llama3-70b-16x8.yaml, tp 8 x pp 4), the first rank of the first, a middle and the last pipeline
stage run in this process on the fake process group (pretrain/simulate.py): bytes by category, measured or
counted, over the planner's estimate for that stage. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

from foundry.pretrain.config import load_config
from foundry.pretrain.simulate import CATEGORIES, GIB, default_ranks, simulate

JOBS = {
    "llama3-8b, 8 GPUs": (["configs/models/llama3-8b.yaml", "configs/llama3-8b-2x8.yaml"], ["launch.nodes=1"]),
    "llama3-8b, 16 GPUs": (["configs/models/llama3-8b.yaml", "configs/llama3-8b-2x8.yaml"], []),
    "llama3-70b, 128 GPUs": (["configs/models/llama3-70b.yaml", "configs/llama3-70b-16x8.yaml"], []),
}


def main() -> None:
    print("| job | rank (tp, pp, dp) | blocks | mode | " + " | ".join(CATEGORIES) + " | total |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in CATEGORIES) + " | --- |")
    for job, (files, overrides) in JOBS.items():
        cfg = load_config(files, overrides)
        for rank in default_ranks(cfg):
            r = simulate(cfg, rank)
            c = r.coordinates
            cells = []
            for key in (*CATEGORIES, "total"):
                got = sum(r.got.values()) if key == "total" else r.got[key]
                planned = sum(r.planned.values()) if key == "total" else r.planned[key]
                cells.append(f"{got / GIB:.2f} / {planned / GIB:.2f} ({got / planned:.3f})" if planned else
                             f"{got / GIB:.2f} / 0")
            print(f"| {job} ({r.layout}) | {rank} ({c['tp']}, {c['pp']}, {c['dp']}) | "
                  f"{r.blocks.start}-{r.blocks[-1]} | {r.mode} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
