"""Activation-form projection: x ← x − λ·U Uᵀ x at the output of residual writers."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


def orthonormalize(raw: Tensor) -> Tensor:
    """Orthonormal columns spanning `raw` ([..., d, k]) via reduced QR, signs fixed so it is deterministic."""
    q, r = torch.linalg.qr(raw.float())
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return q * sign.unsqueeze(-2)


def project_out(x: Tensor, basis: Tensor, strength: Tensor | float = 1.0) -> Tensor:
    """Remove λ times the component of x in span(basis); maths in float32, result in x's dtype."""
    xf = x.float()
    coords = xf @ basis
    return (xf - strength * (coords @ basis.transpose(-1, -2))).to(x.dtype)


class ProjectionHooks:
    """Forward hooks that project each writer's output out of its site's subspace.

    The bases are set per forward (`set`) so a trainable subspace is orthonormalised once per
    step and every hook sees the same tensors; nothing in the model is copied or modified.
    """

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = list(modules)
        self.bases: Tensor | None = None  # [S, d, k]
        self.strengths: Tensor | None = None  # [S]
        self._handles: list = []

    def set(self, bases: Tensor, strengths: Tensor) -> "ProjectionHooks":
        if bases.shape[0] != len(self.modules) or strengths.shape[0] != len(self.modules):
            raise ValueError(f"got {bases.shape[0]} bases and {strengths.shape[0]} strengths for {len(self.modules)} sites")
        self.bases, self.strengths = bases, strengths
        return self

    def _hook(self, index: int):
        def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
            if self.bases is None:
                return output
            basis = self.bases[index].to(output.device)
            return project_out(output, basis, self.strengths[index].to(output.device))
        return hook

    def __enter__(self) -> "ProjectionHooks":
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
