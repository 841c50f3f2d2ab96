"""Resharding from DeepSpeed's own per-rank files (pretrain/reshard.py): read back exactly, under any layout.

The runs here are `python -m tests.test_reshard train ARGS` (see the bottom of this file): `foundry train`
unchanged, except that after each checkpoint save, and right after a resume, every rank also asks its live
engine, through DeepSpeed's own functions (`safe_get_full_fp32_param`, `safe_get_full_optimizer_state`), for
the full fp32 weight and AdamW moments of each parameter and AdamW's step count, and writes them down
(RUN_DIR/saved/stepN/, RUN_DIR/loaded/), with the module's own parameters as parallel/consolidate.py gathers
them. What the reader joins offline from the files must equal what the saving engine held, bit for bit; what a
resharded resume sets into an engine of another layout must equal what the reader joined, bit for bit.
"""

from __future__ import annotations

import os
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch

from foundry.parallel.tensor import Shard
from foundry.pretrain.checkpoint import POINTER, CheckpointError, read_marker, tag_for
from foundry.pretrain.reshard import MOMENTS, STATES, _Checkpoint, full_state, full_weights
from tests.conftest import data_args, read_metrics, torchrun

STEPS = 3
COMMON = [
    "configs/models/tiny.yaml", "configs/quickstart.yaml", f"train.max_steps={STEPS}", "train.global_batch_size=8",
    "train.micro_batch_size=2", "train.warmup_steps=2", "data.seq_len=64", "tracking.log_interval=1",
    f"checkpoint.interval={STEPS}", "checkpoint.resume=true",
    "model.vocab_size=513",  # not divisible by tp 2: the vocabulary is padded, and the padding must not leak
]


def _run(nproc: int, run_dir: Path, shards: Path, layout: list[str], env: dict[str, str] | None = None):
    args = [*COMMON, *data_args(shards), *layout, f"train.run_dir={run_dir}"]
    return torchrun(nproc, args, module="tests.test_reshard", env=env)


def _resume(src: Path, step: int, run_dir: Path, nproc: int, shards: Path, layout: list[str], more: list[str] = ()):
    """Resume checkpoint `step` of run `src` in a run of its own under `layout`."""
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / tag_for(step), run_dir / "checkpoints" / tag_for(step))
    (run_dir / "checkpoints" / POINTER).write_text(tag_for(step))
    out = _run(nproc, run_dir, shards, [*layout, *more])
    assert "resharding" in out.stdout + out.stderr
    return out


def _dumped(where: Path) -> tuple[dict[str, dict[str, torch.Tensor]], list[float]]:
    """What the engine held, as dumped by `_dump`: each parameter's full state by plain name, AdamW's steps."""
    params, steps = {}, set()
    for f in sorted(where.glob("pp*.pt")):
        saved = torch.load(f, weights_only=True)
        params.update(saved["params"])
        steps |= set(saved["steps"])
    return params, sorted(steps)


def _assert_same(got: dict[str, dict[str, torch.Tensor]], expected: dict[str, dict[str, torch.Tensor]], what: str):
    assert sorted(got) == sorted(expected), what
    for name in expected:
        for key in STATES:
            a, b = got[name][key], expected[name][key]
            assert a.shape == b.shape and torch.equal(a, b), (what, name, key, (a - b).abs().max().item()
                                                              if a.shape == b.shape else (a.shape, b.shape))


# Per case: what writer and reader share (the model, the batch), the writer's layout and processes, the reader's.
# Data parallelism 3 splits sizes it does not divide (q_proj's 4096 entries): ZeRO-3's last partition is padded.
DP3 = ["train.global_batch_size=12", "data.streams=12"]  # batch and data streams that dp 1, 2 and 3 divide
CASES = {
    "zero1_tp2_dp2": ([], ["parallel.tensor=2"], 4, ["parallel.zero_stage=2"], 1),
    "zero1_pp2_dp2_tied": (["model.tie_embeddings=true"], ["parallel.pipeline=2"], 4, ["parallel.tensor=2"], 2),
    "bf16_zero1_dp2": (["train.precision=bf16"], [], 2, ["parallel.pipeline=2"], 2),
    "zero3_dp3": (DP3, ["parallel.zero_stage=3"], 3, ["parallel.zero_stage=3"], 2),
    "zero3_tp2_dp2": (DP3, ["parallel.zero_stage=3", "parallel.tensor=2"], 4, ["parallel.zero_stage=3"], 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_reader_joins_exactly_what_the_engine_held_and_loads_it_exactly(case, tmp_path, stdlib_shards):
    shared, writer, nproc, reader, nproc_reader = CASES[case]
    _run(nproc, tmp_path / "written", stdlib_shards, [*shared, *writer, "checkpoint.save_consolidated=true"])
    tag_dir = tmp_path / "written" / "checkpoints" / tag_for(STEPS)
    held, steps = _dumped(tmp_path / "written" / "saved" / tag_for(STEPS))

    # Offline: every parameter whole (vocabulary padding removed), weights and moments, bit for bit.
    joined, step = full_state(tag_dir, read_marker(tag_dir))
    _assert_same(joined, held, "joined offline vs the engine that saved")
    assert steps == [step] == [float(STEPS)]
    weights = full_weights(tag_dir, read_marker(tag_dir), 513, "model.tie_embeddings=true" in shared)
    gathered = torch.load(tmp_path / "written" / "model.pt", weights_only=True)  # parallel/consolidate.py's
    assert sorted(weights) == sorted(gathered) and ("lm_head.weight" in weights)
    if "bf16" not in case:  # the model's own parameters are the fp32 weights (bf16: rounded from them)
        assert all(torch.equal(weights[k], gathered[k]) for k in gathered)

    # Under another layout: what the engine was given, gathered back by DeepSpeed, is what the reader joined.
    _resume(tmp_path / "written", STEPS, tmp_path / "loaded", nproc_reader, stdlib_shards, [*shared, *reader])
    loaded, loaded_steps = _dumped(tmp_path / "loaded" / "loaded")
    _assert_same(loaded, joined, f"loaded under {reader} vs joined")
    assert loaded_steps == [float(STEPS)]
    # and the module's own parameters (ZeRO-3: its partitions, and the small ones it keeps gathered) are the weights
    module = torch.load(tmp_path / "loaded" / "loaded" / "model.pt", weights_only=True)
    dtype = torch.bfloat16 if "train.precision=bf16" in shared else torch.float32
    assert sorted(module) == sorted(weights)
    assert all(torch.equal(module[k], weights[k].to(dtype).float()) for k in weights), case


def test_a_zero3_checkpoint_resumes_under_zero1_layouts_with_the_uninterrupted_losses(tmp_path, stdlib_shards):
    """(tp,pp,dp) = (1,1,2) ZeRO-3 -> (1,1,1) ZeRO-1 and (2,1,1) ZeRO-1, through the real resume path."""
    steps = ["train.max_steps=6", "checkpoint.interval=3"]
    _run(2, tmp_path / "straight", stdlib_shards, ["parallel.zero_stage=3", *steps])
    straight = {m["step"]: m for m in read_metrics(tmp_path / "straight")}
    for nproc, layout in ((1, []), (2, ["parallel.tensor=2"])):
        run = tmp_path / f"resharded{nproc}"
        _resume(tmp_path / "straight", 3, run, nproc, stdlib_shards, layout, steps)
        resumed = read_metrics(run)
        assert [m["step"] for m in resumed] == [4, 5, 6]
        for m in resumed:
            assert m["loss"] == pytest.approx(straight[m["step"]]["loss"], rel=1e-4), (layout, m)
            assert m["lr"] == pytest.approx(straight[m["step"]]["lr"], rel=1e-6), (layout, m)


def test_adamw_resumes_at_its_own_step_count_not_the_training_step(tmp_path, stdlib_shards):
    """Step 2 is skipped (a NaN injected by tests/inject_faults.py on rank 1): after 3 training steps AdamW has
    stepped twice, and its bias correction must go on from 2."""
    env = {"FOUNDRY_NAN_RANK": "1", "FOUNDRY_NAN_STEPS": "2"}
    _run(2, tmp_path / "written", stdlib_shards, [], env=env)
    assert [m["skipped_steps"] for m in read_metrics(tmp_path / "written")] == [0, 1, 1]
    tag_dir = tmp_path / "written" / "checkpoints" / tag_for(STEPS)
    assert _dumped(tmp_path / "written" / "saved" / tag_for(STEPS))[1] == [STEPS - 1.0]
    assert full_state(tag_dir, read_marker(tag_dir), ("fp32",))[1] == STEPS - 1
    _resume(tmp_path / "written", STEPS, tmp_path / "loaded", 1, stdlib_shards, [])
    assert _dumped(tmp_path / "loaded" / "loaded")[1] == [STEPS - 1.0]


# Without processes: what is read, and what is refused.


def _record(rank: int, tp: int, dp: int, held: tuple[str, ...] = ("q.weight", "norm.weight")) -> dict:
    """A ZeRO-1 rank's record of a model with a q_proj split over tp and a norm replicated; its optimizer partition
    holds fragments of `held`."""
    return {"rank": rank, "tp": tp, "pp": 0, "dp": dp, "files": [f"r{rank}_optim_states.pt"], "params": {
        "q.weight": {"name": "q.weight", "shape": [8, 4], "dim": 0, "held": "q.weight" in held},
        "norm.weight": {"name": "norm.weight", "shape": [4], "dim": None, "held": "norm.weight" in held}}}


def _tp2_marker(zero_stage: int = 1) -> dict:
    return {"identity": {"layout": {"tp": 2, "pp": 1, "dp": 1}, "zero_stage": zero_stage},
            "ranks": [_record(0, 0, 0), _record(1, 1, 0)]}


def test_a_rank_reads_only_the_writer_ranks_holding_its_parts(tmp_path):
    ckpt = _Checkpoint(tmp_path, _tp2_marker())
    # tp rank 1 of tp 2 again: its own writer's files only (the replicated norm too, though tp rank 0 has it).
    assert ckpt.plan({"q.weight": Shard((8, 4), 0, 1, 2), "norm.weight": Shard((4,))}) == {
        (1, 0): ["q.weight", "norm.weight"]}
    # one process: both halves of q; the norm from the first.
    assert ckpt.plan({"q.weight": Shard((8, 4)), "norm.weight": Shard((4,))}) == {
        (0, 0): ["q.weight", "norm.weight"], (1, 0): ["q.weight"]}
    # tp 4: part 1 of 4 lies in the writer's part 0 only.
    assert ckpt.plan({"q.weight": Shard((8, 4), 0, 1, 4)}) == {(0, 0): ["q.weight"]}


def test_of_a_model_rank_only_the_data_parallel_ranks_holding_a_fragment_are_read(tmp_path, monkeypatch):
    import foundry.pretrain.reshard as reshard

    marker = {"identity": {"layout": {"tp": 1, "pp": 1, "dp": 2}, "zero_stage": 1},
              "ranks": [_record(0, 0, 0, held=("q.weight",)), _record(1, 0, 1)]}
    monkeypatch.setattr(reshard, "_Partition", lambda path, zero_stage, record: path.name)  # what would be read
    ckpt = _Checkpoint(tmp_path, marker)
    assert ckpt._read((0, 0), ["norm.weight"]) == ["r1_optim_states.pt"]
    assert ckpt._read((0, 0), ["q.weight"]) == ["r0_optim_states.pt", "r1_optim_states.pt"]  # in dp order
    marker["identity"]["zero_stage"] = 3  # every rank holds a part of every parameter
    assert _Checkpoint(tmp_path, marker)._read((0, 0), ["norm.weight"]) == ["r0_optim_states.pt", "r1_optim_states.pt"]


def test_what_cannot_be_read_is_refused_naming_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match="ZeRO-0.*checkpoint.save_consolidated=true"):
        full_weights(tmp_path, _tp2_marker(zero_stage=0), 8, False)
    with pytest.raises(CheckpointError, match="does not record what each rank's files hold.*layout and ZeRO stage"):
        full_weights(tmp_path, {"identity": _tp2_marker()["identity"]}, 8, False)
    with pytest.raises(CheckpointError, match="holds no parameter lm_head.weight: it was written for another model"):
        _Checkpoint(tmp_path, _tp2_marker()).plan({"lm_head.weight": Shard((8, 4))})
    with pytest.raises(CheckpointError, match=r"q.weight has shape \[8, 4\], this model's has \[8, 8\]"):
        _Checkpoint(tmp_path, _tp2_marker()).plan({"q.weight": Shard((8, 8))})


# `python -m tests.test_reshard train ARGS`: `foundry train` that writes down what its engine holds.


def _dump(run, out: Path) -> None:
    """Collective: each parameter's full fp32 weight and AdamW moments, as DeepSpeed's own functions gather them over
    data parallelism (and we over tensor parallelism, vocabulary padding cut), and AdamW's step counts; written to
    `out`/pp<stage>.pt by the first rank of each pipeline stage. And the module's own parameters, gathered by
    parallel/consolidate.py, in `out`/model.pt."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from foundry.parallel.consolidate import full_state_dict

    zero, topology = run.engine.optimizer, run.topology
    if hasattr(zero, "_hp_optimizer_states_linked"):  # ZeRO 1/2: DeepSpeed links only the first group's moments
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    params = {}
    for p in run.engine.module.parameters():
        state = {"fp32": safe_get_full_fp32_param(p), **{k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}}
        shard = getattr(p, "shard", None)
        for key, value in state.items():
            value = value.detach().float().cpu()
            if shard is not None and shard.dim is not None:
                parts = [torch.empty_like(value) for _ in range(shard.parts)]
                dist.all_gather(parts, value.contiguous(), group=topology.get_tensor_model_parallel_group())
                value = torch.cat(parts, shard.dim).narrow(shard.dim, 0, shard.full_shape[shard.dim])
            state[key] = value
        params[run.plain_names[id(p)]] = state
    steps = sorted({float(s["step"]) for s in zero.optimizer.state.values() if "step" in s})
    model = run.cfg.model
    module = full_state_dict(run.engine.module, run.plain_names, topology, model.vocab_size, model.tie_embeddings)
    if topology.dp_rank == 0 and topology.tp_rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"params": params, "steps": steps}, out / f"pp{topology.pp_rank}.pt")
    if dist.get_rank() == 0:
        torch.save(module, out / "model.pt")


def _main() -> None:
    from foundry.launch.cli import main
    from foundry.pretrain.checkpointer import Checkpointer

    save, resume = Checkpointer.save, Checkpointer.resume

    def save_and_dump(self, step, notes):
        save(self, step, notes)
        _dump(self.run, self.run.run_dir / "saved" / tag_for(step))  # the engine as saved: nothing has changed it

    def resume_and_dump(self):
        step = resume(self)
        if self.resumed_from is not None:
            _dump(self.run, self.run.run_dir / "loaded")
        return step

    Checkpointer.save, Checkpointer.resume = save_and_dump, resume_and_dump
    if "FOUNDRY_NAN_RANK" in os.environ:
        runpy.run_module("tests.inject_faults", run_name="__main__")  # its faults, then `foundry train`
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    _main()
