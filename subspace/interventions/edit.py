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
from subspace.interventions.projection import ProjectionHooks, bias_delta, weight_factors
from subspace.interventions.sites import resolve_sites
from subspace.utils.io import atomic_path
from subspace.utils.sharded import full

MASK_PREFIX = "expert_mask."  # saved tensors "expert_mask.<site>": uint8 [num_experts]


@dataclass
class ProjectionEdit:
    """`W_s' = (I − λ_s U_s U_sᵀ) W_s` for each residual writer `s` (module name in `sites`).

    The same edit applies as forward hooks on the writers' outputs (activation form, `applied`) or as
    rank-k deltas `B A` with `B = −λU`, `A = UᵀW` (weight form, a LoRA with `lora_alpha = r`; `merged`).
    A site may also name stacked expert weights `[num_experts, d, in]` (fused MoE experts): every expert's
    slice is edited, in weight form in both cases, or only those flagged in `expert_masks[site]`; with every
    expert edited, `applied` projects the experts module's output instead where that is the same edit
    (`Site.output_equivalent`).
    A site naming another module (a MoE block's output) has the activation form only.
    """

    sites: list[str]
    bases: Tensor  # [S, d, k], float32, orthonormal columns
    strengths: Tensor  # [S], float32
    meta: dict = field(default_factory=dict)
    expert_masks: dict[str, Tensor] = field(default_factory=dict)  # site → bool [num_experts]; absent: every expert

    def __post_init__(self) -> None:
        self.bases = self.bases.detach().float().cpu()
        self.strengths = self.strengths.detach().float().cpu()
        if self.bases.ndim != 3 or self.bases.shape[0] != len(self.sites) or self.strengths.shape != (len(self.sites),):
            raise ValueError(f"edit shapes disagree: {len(self.sites)} sites, bases {tuple(self.bases.shape)}, "
                             f"strengths {tuple(self.strengths.shape)}")
        self.expert_masks = {site: mask.detach().bool().cpu() for site, mask in self.expert_masks.items()}
        if unknown := sorted(set(self.expert_masks) - set(self.sites)):
            raise ValueError(f"expert masks given for {unknown}, which are not among the edit's sites")

    @property
    def rank(self) -> int:
        return self.bases.shape[-1]

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Activation form: the model behaves edited inside the block, untouched outside it."""
        with ProjectionHooks.for_sites(model, self.sites, self.expert_masks) as hooks:
            hooks.set(self.bases, self.strengths)
            yield model

    def has_weight_form(self, model: nn.Module) -> bool:
        """False when a site is a block's output (moe_scope=layer_output): hooks only, no merge or export."""
        return all(site.parameter is not None for site in resolve_sites(model, self.sites, self.expert_masks))

    def lora_factors(self, model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
        """Weight form per site: (A [k, in], B [d, k]) with W' = W + B A; stacked experts: A [E, k, in], B [E, d, k].
        The factors act on activations (`out += B A x`): a transposed writer (Conv1D [in, d], gpt-oss experts
        [E, in, d]) gets the factors of the matrix it applies, and its stored weight changes by `(B A)ᵀ`.
        On a sharded model (trainer=fsdp) each weight is gathered first: every rank must call this."""
        sites = resolve_sites(model, self.sites, self.expert_masks)
        factors = {}
        for site, basis, strength in zip(sites, self.bases, self.strengths):
            weight = full(site.weight.detach()).float().cpu()
            applied = weight.transpose(-1, -2) if site.transposed else weight  # the matrix it applies: [(E,) d, in]
            factors[site.name] = weight_factors(applied, basis, strength, site.expert_mask)
        return factors

    def bias_deltas(self, model: nn.Module) -> dict[str, Tensor]:
        """`(I − λUUᵀ) b − b` for each writer that adds a bias, by the bias parameter's name (float32, CPU)."""
        sites = resolve_sites(model, self.sites, self.expert_masks)
        return {site.bias_name: bias_delta(full(site.bias_tensor.detach()).float().cpu(), basis, strength,
                                           site.expert_mask)
                for site, basis, strength in zip(sites, self.bases, self.strengths) if site.bias is not None}

    def weight_deltas(self, model: nn.Module) -> dict[str, Tensor]:
        """Weight form as full float32 CPU deltas by parameter name, for `merged_deltas`: `"<site>.weight": B A`
        for a linear writer (`(B A)ᵀ` for a transposed one, stacked too), `"<site>": B A` ([E, d, in]) for stacked experts, and
        each writer's bias delta (`bias_deltas`)."""
        sites = {site.name: site for site in resolve_sites(model, self.sites, self.expert_masks)}
        deltas = {}
        for name, (a, b) in self.lora_factors(model).items():
            site = sites[name]
            delta = b @ a
            deltas[site.parameter_name] = delta.transpose(-1, -2) if site.transposed else delta
        return deltas | self.bias_deltas(model)

    def merged(self, model: nn.Module) -> AbstractContextManager[nn.Module]:
        """Weight form in place: inside the block the weights are what a merged checkpoint holds (rounding
        included) and the forward runs unhooked; the originals are copied back bit-exactly after."""
        return merged_deltas(model, self.weight_deltas(model))

    def save(self, path: str | Path) -> None:
        meta = {"sites": json.dumps(self.sites), "meta": json.dumps(self.meta, default=str)}
        tensors = {"bases": self.bases.contiguous(), "strengths": self.strengths.contiguous()}
        tensors |= {f"{MASK_PREFIX}{site}": mask.to(torch.uint8).contiguous()
                    for site, mask in self.expert_masks.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "ProjectionEdit":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            header = f.metadata()
        tensors = load_file(str(path))
        masks = {name[len(MASK_PREFIX):]: t.bool() for name, t in tensors.items() if name.startswith(MASK_PREFIX)}
        return cls(json.loads(header["sites"]), tensors["bases"], tensors["strengths"], json.loads(header["meta"]),
                   masks)
