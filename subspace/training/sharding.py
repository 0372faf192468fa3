"""FSDP2 for a frozen model too large for one device (`trainer=fsdp`, `HybridShardStrategy`).

Every decoder layer and the rest of the model become `fully_shard` units over Lightning's 2-D device mesh, whose
dimensions are nodes × devices per node (`data_parallel_size` and `tensor_parallel_size`, both `auto`): FSDP2 keeps
one replica per node and shards it over the node's devices (HSDP), so each device holds 1/devices of the weights,
gathers one layer at a time, and every all-gather stays inside a node. Module names stay as they were, so the
projection hooks fire on the gathered outputs. The subspace is sharded as well, which makes FSDP2 average its
gradients over the ranks, and the batches are shared out over all of them. Every forward of a sharded model is a
collective: all ranks must run the same forwards in step.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard


def shard_frozen_model(model: nn.Module, layers: nn.ModuleList, mesh: DeviceMesh) -> None:
    """One FSDP2 unit per decoder layer, then the root for what is left (embeddings, final norm, head; a tied
    embedding and head are one parameter, so one unit holds it)."""
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model._is_fsdp_managed_module = True  # transformers' marker: generate() then runs with synced_gpus


class HybridShardStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy with every rank a data-parallel replica: the mesh's second dimension
    shards the model (FSDP2, `SubspaceModule.configure_model`), never tensors, so each rank takes its own share of
    the batches instead of one share per node."""

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}
