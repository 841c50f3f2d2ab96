"""The one owner of the process groups: tensor (tp), pipeline (pp) and data (dp) parallelism.

Ranks are laid out by DeepSpeed's PipeModelDataParallelTopology with axes (pipe, data, model),
model varying fastest, so tensor-parallel peers are neighbouring ranks, i.e. on the same node
with the fastest links. An example with 16 ranks, tp=2, pp=2, dp=4:

    tensor groups   [0,1] [2,3] [4,5] [6,7] [8,9] [10,11] [12,13] [14,15]
    data groups     [0,2,4,6] [1,3,5,7] [8,10,12,14] [9,11,13,15]
    pipeline groups [0,8] [1,9] [2,10] [3,11] [4,12] [5,13] [6,14] [7,15]
    model groups    [0,1,8,9] [2,3,10,11] [4,5,12,13] [6,7,14,15]  (one data-parallel replica each)
    stage 0 holds ranks 0-7, stage 1 ranks 8-15.

`Topology` is also the model-parallel unit ("mpu") that DeepSpeed's engine asks for groups, by
Megatron's names: get_{tensor_model,pipeline_model,data,model}_parallel_{group,rank,world_size}.
Under pipeline parallelism DeepSpeed builds its own grid from the same `ds_topology`, so the groups agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch.distributed as dist

from foundry.parallel.layout import Layout, LayoutError


class ParallelGroup(NamedTuple):
    """This rank's process group along one axis, its rank in it and the group's size."""

    group: Any
    rank: int
    world_size: int


@dataclass
class Topology:
    """This rank's place in the layout and its process groups. Create once, after init_process_group."""

    layout: Layout
    ds_topology: Any = field(init=False, repr=False)
    # Keyed by Megatron's axis names: tensor_model, pipeline_model, data and model (tp x pp: one replica).
    axes: dict[str, ParallelGroup] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        lay = self.layout
        if dist.get_world_size() != lay.world_size:
            raise LayoutError(f"{lay} needs {lay.world_size} processes, got {dist.get_world_size()}")
        self.ds_topology = PipeModelDataParallelTopology(num_pp=lay.pp, num_mp=lay.tp, num_dp=lay.dp)
        rank = dist.get_rank()
        coord = self.ds_topology.get_coord(rank)
        self.tp_rank, self.pp_rank, self.dp_rank = coord.model, coord.pipe, coord.data
        replicas = [sorted(self.ds_topology.filter_match(data=d)) for d in range(lay.dp)]
        comm_lists = {"tensor_model": self.ds_topology.get_axis_comm_lists("model"),
                      "data": self.ds_topology.get_axis_comm_lists("data"),
                      "pipeline_model": self.ds_topology.get_axis_comm_lists("pipe"),
                      "model": replicas}
        ranks = {"tensor_model": self.tp_rank, "data": self.dp_rank, "pipeline_model": self.pp_rank,
                 "model": self.pp_rank * lay.tp + self.tp_rank}
        # Every rank must create every group, in the same order, even those it is not in.
        self.axes = {}
        for axis, lists in comm_lists.items():
            for members in lists:
                group = dist.new_group(ranks=members)
                if rank in members:
                    self.axes[axis] = ParallelGroup(group, ranks[axis], len(members))

    # The mpu interface DeepSpeed's engine calls, by Megatron's names.

    def get_tensor_model_parallel_group(self) -> Any: return self.axes["tensor_model"].group
    def get_tensor_model_parallel_rank(self) -> int: return self.axes["tensor_model"].rank
    def get_tensor_model_parallel_world_size(self) -> int: return self.axes["tensor_model"].world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_rank() - self.tp_rank

    def get_pipeline_model_parallel_group(self) -> Any: return self.axes["pipeline_model"].group
    def get_pipeline_model_parallel_rank(self) -> int: return self.axes["pipeline_model"].rank
    def get_pipeline_model_parallel_world_size(self) -> int: return self.axes["pipeline_model"].world_size

    def get_data_parallel_group(self) -> Any: return self.axes["data"].group
    def get_data_parallel_rank(self) -> int: return self.axes["data"].rank
    def get_data_parallel_world_size(self) -> int: return self.axes["data"].world_size

    def get_model_parallel_group(self) -> Any: return self.axes["model"].group
    def get_model_parallel_rank(self) -> int: return self.axes["model"].rank
    def get_model_parallel_world_size(self) -> int: return self.axes["model"].world_size
