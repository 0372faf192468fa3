"""The artefact every method produces: per-site subspaces and strengths, applied as hooks or weight deltas."""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from subspace.interventions.merge import merged_deltas
from subspace.interventions.projection import ProjectionHooks
from subspace.utils.io import atomic_path


@dataclass
class ProjectionEdit:
    """`W_s' = (I − λ_s U_s U_sᵀ) W_s` for each residual writer `s` (module name in `sites`).

    The same edit applies as forward hooks on the writers' outputs (activation form, `applied`) or as
    rank-k deltas `B A` with `B = −λU`, `A = UᵀW` (weight form, a LoRA with `lora_alpha = r`; `merged`).
    """

    sites: list[str]
    bases: Tensor  # [S, d, k], float32, orthonormal columns
    strengths: Tensor  # [S], float32
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bases = self.bases.detach().float().cpu()
        self.strengths = self.strengths.detach().float().cpu()
        if self.bases.ndim != 3 or self.bases.shape[0] != len(self.sites) or self.strengths.shape != (len(self.sites),):
            raise ValueError(f"edit shapes disagree: {len(self.sites)} sites, bases {tuple(self.bases.shape)}, "
                             f"strengths {tuple(self.strengths.shape)}")

    @property
    def rank(self) -> int:
        return self.bases.shape[-1]

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Activation form: the model behaves edited inside the block, untouched outside it."""
        modules = [model.get_submodule(name) for name in self.sites]
        with ProjectionHooks(modules) as hooks:
            hooks.set(self.bases, self.strengths)
            yield model

    def lora_factors(self, model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
        """Weight form per site: (A [k, in], B [d, k]) with W' = W + B A."""
        factors = {}
        for name, basis, strength in zip(self.sites, self.bases, self.strengths):
            weight = model.get_submodule(name).weight.detach().float().cpu()
            factors[name] = (basis.T @ weight, -strength * basis)
        return factors

    def weight_deltas(self, model: nn.Module) -> dict[str, Tensor]:
        """Weight form as full float32 CPU deltas by parameter name, `"<site>.weight": B A`, for `merged_deltas`."""
        return {f"{site}.weight": b @ a for site, (a, b) in self.lora_factors(model).items()}

    def merged(self, model: nn.Module) -> AbstractContextManager[nn.Module]:
        """Weight form in place: inside the block the weights are what a merged checkpoint holds (rounding
        included) and the forward runs unhooked; the originals are copied back bit-exactly after."""
        return merged_deltas(model, self.weight_deltas(model))

    def save(self, path: str | Path) -> None:
        meta = {"sites": json.dumps(self.sites), "meta": json.dumps(self.meta, default=str)}
        with atomic_path(path) as tmp:
            save_file({"bases": self.bases.contiguous(), "strengths": self.strengths.contiguous()}, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "ProjectionEdit":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            header = f.metadata()
        tensors = load_file(str(path))
        return cls(json.loads(header["sites"]), tensors["bases"], tensors["strengths"], json.loads(header["meta"]))
