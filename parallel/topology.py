"""The one owner of the process groups: tensor (tp), pipeline (pp) and data (dp) parallelism.

Ranks are laid out by DeepSpeed's PipeModelDataParallelTopology with axes (pipe, data, model),
model varying fastest, so tensor-parallel peers are neighbouring ranks, i.e. on the same node
with the fastest links. An example with 16 ranks, tp=2, pp=2, dp=4:

    tensor groups   [0,1] [2,3] [4,5] [6,7] [8,9] [10,11] [12,13] [14,15]
    data groups     [0,2,4,6] [1,3,5,7] [8,10,12,14] [9,11,13,15]
    pipeline groups [0,8] [1,9] [2,10] [3,11] [4,12] [5,13] [6,14] [7,15]
    stage 0 holds ranks 0-7, stage 1 ranks 8-15.

`Topology` is also the model-parallel unit ("mpu") that DeepSpeed's engine asks for groups
(get_{tensor_model,pipeline_model,data,model}_parallel_{group,rank,world_size}). Under pipeline
parallelism DeepSpeed builds its own grid from the same `ds_topology`, so the groups agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from foundry.pretrain.config import ConfigError, ModelConfig, ParallelConfig, divisors


@dataclass(frozen=True)
class Layout:
    """The degrees of parallelism; checked against the world size and the model before any group exists."""

    tp: int
    pp: int
    dp: int

    @staticmethod
    def from_config(parallel: ParallelConfig, model: ModelConfig, world_size: int) -> "Layout":
        tp, pp = parallel.tensor, parallel.pipeline
        if tp < 1 or pp < 1:
            raise ConfigError(f"parallel.tensor={tp} and parallel.pipeline={pp} must be >= 1")
        if world_size % (tp * pp):
            ok = [(t, p) for t in divisors(world_size) for p in divisors(world_size // t)][:6]
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline = {tp} x {pp}: "
                f"use (tensor, pipeline) among {ok} or launch a multiple of {tp * pp} processes"
            )
        if model.num_heads % tp:
            raise ConfigError(
                f"model.num_heads={model.num_heads} is not divisible by parallel.tensor={tp}: "
                f"use parallel.tensor among {[t for t in divisors(model.num_heads) if world_size % t == 0]}"
            )
        if model.num_kv_heads % tp and tp % model.num_kv_heads:
            raise ConfigError(
                f"model.num_kv_heads={model.num_kv_heads} and parallel.tensor={tp}: one must divide the other "
                f"(kv heads are split when more than tp, replicated when fewer)"
            )
        if model.ffn_hidden_size % tp:
            raise ConfigError(f"model.ffn_hidden_size={model.ffn_hidden_size} is not divisible by parallel.tensor={tp}")
        if pp > model.num_layers:
            raise ConfigError(
                f"parallel.pipeline={pp} exceeds model.num_layers={model.num_layers}: "
                f"use at most {model.num_layers} stages"
            )
        if pp > 1 and parallel.zero_stage > 1:
            raise ConfigError(
                f"parallel.zero_stage={parallel.zero_stage} with parallel.pipeline={pp}: DeepSpeed's pipeline engine "
                f"supports ZeRO 0 and 1 only; use parallel.zero_stage=1"
            )
        if parallel.sequence_parallel and tp == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor > 1: turn it off or raise tensor")
        return Layout(tp=tp, pp=pp, dp=world_size // (tp * pp))

    def __str__(self) -> str:
        return f"tp {self.tp} x pp {self.pp} x dp {self.dp}"


@dataclass
class Topology:
    """This rank's place in the layout and its process groups. Create once, after init_process_group."""

    layout: Layout
    ds_topology: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        lay = self.layout
        if dist.get_world_size() != lay.tp * lay.pp * lay.dp:
            raise ConfigError(f"{lay} needs {lay.tp * lay.pp * lay.dp} processes, got {dist.get_world_size()}")
        self.ds_topology = PipeModelDataParallelTopology(num_pp=lay.pp, num_mp=lay.tp, num_dp=lay.dp)
        rank = dist.get_rank()
        coord = self.ds_topology.get_coord(rank)
        self.tp_rank, self.pp_rank, self.dp_rank = coord.model, coord.pipe, coord.data
        # Every rank must create every group, in the same order, even those it is not in.
        self._groups = {}
        for axis in ("model", "data", "pipe"):
            for ranks in self.ds_topology.get_axis_comm_lists(axis):
                group = dist.new_group(ranks=ranks)
                if rank in ranks:
                    self._groups[axis] = group
        # DeepSpeed's "model parallel" group: every rank holding a different part of the same replica.
        for ranks in self._replica_lists():
            group = dist.new_group(ranks=ranks)
            if rank in ranks:
                self._groups["replica"] = group

    def _replica_lists(self) -> list[list[int]]:
        return [sorted(self.ds_topology.filter_match(data=d)) for d in range(self.layout.dp)]

    # Tensor parallelism.
    def get_tensor_model_parallel_group(self) -> Any:
        return self._groups["model"]

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.layout.tp

    # Pipeline parallelism.
    def get_pipeline_model_parallel_group(self) -> Any:
        return self._groups["pipe"]

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.layout.pp

    # Data parallelism.
    def get_data_parallel_group(self) -> Any:
        return self._groups["data"]

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.layout.dp

    # DeepSpeed's model-parallel unit: all of tp x pp within one data-parallel replica.
    def get_model_parallel_group(self) -> Any:
        return self._groups["replica"]

    def get_model_parallel_rank(self) -> int:
        return self.pp_rank * self.layout.tp + self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.layout.tp * self.layout.pp

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_rank() - self.tp_rank
