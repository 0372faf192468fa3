"""Tensors and modules that FSDP2 may have sharded into DTensors (trainer=fsdp, subspace/training/sharding.py)."""

from __future__ import annotations

from torch import Tensor, nn
from torch.distributed.tensor import DTensor


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def full(tensor: Tensor) -> Tensor:
    """The whole tensor: gathered from every rank for a sharded one (a collective: every rank must call it)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
