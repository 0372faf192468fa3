"""Projection maths, and hooks applying it while a model runs: x ← x − λ·U Uᵀ x at the output of residual
writers, or W ← (I − λ·U Uᵀ) W on stacked expert weights, whose per-expert outputs are never materialised
(unless that equals projecting the experts module's output, which is then done instead: `ProjectionHooks.paths`)."""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from subspace.interventions.sites import Site, resolve_sites


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


def weight_factors(weight: Tensor, basis: Tensor, strength: Tensor | float = 1.0,
                   expert_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(A, B) with `(I − λUUᵀ) W = W + B A`, float32: `A = UᵀW`, `B = −λU` (a rank-k LoRA, `lora_alpha = r`).

    For stacked expert weights `W [E, d, in]` the factors are per expert, `A [E, k, in]` and `B [E, d, k]`, all
    experts in one product; `expert_mask [E]` zeroes B for the experts left unedited. A transposed weight (Conv1D
    `[in, d]`, gpt-oss experts `[E, in, d]`) is passed as its transpose, the matrix it applies.
    """
    a = basis.transpose(-1, -2) @ weight.float()
    b = -torch.as_tensor(strength, dtype=torch.float32, device=basis.device) * basis
    if weight.ndim == 3:
        b = (b.expand(weight.shape[0], -1, -1) if expert_mask is None
             else expert_mask.to(basis.device, torch.float32)[:, None, None] * b)
    return a, b


def bias_delta(bias: Tensor, basis: Tensor, strength: Tensor | float = 1.0,
               expert_mask: Tensor | None = None) -> Tensor:
    """`(I − λUUᵀ) b − b` for a writer's bias `b [d]` (or stacked experts' `[E, d]`, rows masked by `expert_mask`)."""
    delta = -torch.as_tensor(strength, dtype=torch.float32, device=basis.device) * (
        (bias.float() @ basis) @ basis.transpose(-1, -2))
    if expert_mask is not None and bias.ndim == 2:
        delta = expert_mask.to(basis.device, torch.float32)[:, None] * delta
    return delta


def projected_weight(weight: Tensor, basis: Tensor, strength: Tensor | float = 1.0,
                     expert_mask: Tensor | None = None, transposed: bool = False) -> Tensor:
    """`(I − λUUᵀ) W` (for the experts masked in), `W (I − λUUᵀ)` for a transposed W: float32 maths, W's dtype out;
    differentiable in U and λ."""
    applied = weight.transpose(-1, -2) if transposed else weight
    a, b = weight_factors(applied, basis, strength, expert_mask)
    edited = applied.float() + b @ a
    return (edited.transpose(-1, -2) if transposed else edited).to(weight.dtype)


EditPath = Literal["output", "weight"]  # how a site is edited while a forward runs


class ProjectionHooks:
    """While entered, each site is edited by its subspace: writer outputs are projected (forward hooks) and
    stacked expert weights are swapped for their projected copy for the duration of the experts' forward.

    The swap costs a projected copy of every expert's weights per layer, which autograd keeps for backward
    (2.4 GiB a Qwen3-30B-A3B layer). So with `lean_experts`, a stacked site whose edit equals projecting its
    module's output (`Site.output_equivalent`: every expert edited, a module that sums its experts linearly
    with no bias) is projected at that output instead: the same edit, keeping only [tokens, d] activations.

    The bases are set per forward (`set`) so a trainable subspace is orthonormalised once per step and every
    hook sees the same tensors; with no bases set (`bases = None`) the model runs unedited. Nothing in the
    model is modified outside a forward; the expert weights are restored after it even if it raises.
    A site whose weights several module objects run (tied encoder/decoder halves, `Site.aliases`) is hooked on
    each of them, so the edit reaches every forward that uses its weights.
    """

    def __init__(self, targets: Sequence[nn.Module | Site], lean_experts: bool = True):
        self.sites = [t if isinstance(t, Site) else Site(type(t).__name__, t, "output") for t in targets]
        # per site: "output" (a hook projects the module's output) or "weight" (projected stacked weights swapped in)
        self.paths: list[EditPath] = ["weight" if s.stacked and not (lean_experts and s.output_equivalent) else "output"
                                  for s in self.sites]
        self.bases: Tensor | None = None  # [S, d, k]
        self.strengths: Tensor | None = None  # [S]
        self._handles: list = []

    @classmethod
    def for_sites(cls, model: nn.Module, names: Sequence[str], expert_masks: dict[str, Tensor] | None = None,
                  lean_experts: bool = True) -> "ProjectionHooks":
        """Hooks for an edit's sites by name (modules, or stacked-experts parameters with optional expert masks)."""
        return cls(resolve_sites(model, list(names), expert_masks), lean_experts)

    @property
    def modules(self) -> list[nn.Module]:
        return [site.module for site in self.sites]

    def set(self, bases: Tensor, strengths: Tensor) -> "ProjectionHooks":
        if bases.shape[0] != len(self.sites) or strengths.shape[0] != len(self.sites):
            raise ValueError(f"got {bases.shape[0]} bases and {strengths.shape[0]} strengths "
                             f"for {len(self.sites)} sites")
        self.bases, self.strengths = bases, strengths
        return self

    def _output_hook(self, index: int):
        def hook(_module: nn.Module, _inputs: tuple, output):
            if self.bases is None:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            basis, strength = self.bases[index].to(hidden.device), self.strengths[index].to(hidden.device)
            projected = project_out(hidden, basis, strength)
            return (projected, *output[1:]) if isinstance(output, tuple) else projected
        return hook

    def _weight_hooks(self, index: int) -> list:
        """Swap the stacked weights for their projected copy around the experts' forward (the module reads it as an
        attribute, as `torch.func.functional_call` would pass it), and put the parameter back after, always."""
        site = self.sites[index]
        original, original_bias = site.weight, site.bias_tensor

        def swap_in(module: nn.Module, _inputs: tuple) -> None:
            if self.bases is not None:
                basis, strength = self.bases[index].to(original.device), self.strengths[index].to(original.device)
                module._parameters[site.parameter] = projected_weight(original, basis, strength, site.expert_mask,
                                                                      site.transposed)
                if original_bias is not None:
                    module._parameters[site.bias] = (original_bias.float() + bias_delta(
                        original_bias, basis, strength, site.expert_mask)).to(original_bias.dtype)

        def restore(module: nn.Module, _inputs: tuple, _output) -> None:
            module._parameters[site.parameter] = original
            if original_bias is not None:
                module._parameters[site.bias] = original_bias

        return [handle for module in site.modules for handle in
                (module.register_forward_pre_hook(swap_in), module.register_forward_hook(restore, always_call=True))]

    def __enter__(self) -> "ProjectionHooks":
        for i, (site, path) in enumerate(zip(self.sites, self.paths)):
            if path == "weight":
                self._handles += self._weight_hooks(i)
            else:
                self._handles += [module.register_forward_hook(self._output_hook(i)) for module in site.modules]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
