"""The post-norm gap: how much of an edit's direction a weight-form edit leaves in the residual stream.

An edit `W ← (I − λUUᵀ)W` on a residual writer removes λ of the writer's output along U. In a pre-norm block that
output joins the residual stream as it is, so the weight form *is* the projection of the residual stream's
increment. In a post-norm block (DiffusionGemma) the output is RMS-normalised and scaled per channel first, which
turns some of what is left back towards U: the weight form then leaves more along U than the projection it stands
for. This module gives both forms of one edit and measures, layer by layer, the component along U of what each
layer adds to the residual stream, relative to the unedited model's.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import AbstractContextManager, nullcontext
from typing import Iterable, Sequence

import torch
from torch import Tensor

from subspace.analysis.edit_layers import check_edit_fits
from subspace.evaluation.evaluator import Evaluator
from subspace.families.base import SITE_KINDS, Family
from subspace.interventions.edit import ProjectionEdit


def residual_form(edit: ProjectionEdit, family: Family) -> ProjectionEdit:
    """The same edit applied where each site's sub-layer joins the residual stream (`Family.residual_entry`).

    Sites that share an entry (a post-norm over the dense MLP and every expert) must share a basis; their
    strengths are averaged, since one projection stands for all of them (equal for difference of means)."""
    check_edit_fits(edit, family)
    by_name = {s.name: s for s in family.writer_sites(kinds=SITE_KINDS)}
    groups: dict[str, list[int]] = defaultdict(list)
    for i, name in enumerate(edit.sites):
        groups[family.residual_entry(by_name[name])].append(i)
    bases, strengths = [], []
    for entry, members in groups.items():
        first = edit.bases[members[0]]
        if any(not torch.allclose(edit.bases[i], first) for i in members[1:]):
            raise ValueError(f"sites {[edit.sites[i] for i in members]} join the residual stream through {entry!r} "
                             "but have different bases: one projection there cannot stand for them "
                             "(use method.scope=per_layer or global)")
        bases.append(first)
        strengths.append(edit.strengths[members].mean())
    meta = edit.meta | {"form": "residual", "sites_from": list(edit.sites)}
    return ProjectionEdit(list(groups), torch.stack(bases), torch.stack(strengths), meta)


@torch.no_grad()
def along_edit(evaluator: Evaluator, prompts: Sequence[str], residual: ProjectionEdit,
               edited: AbstractContextManager | None = None) -> Tensor:
    """Per residual entry of `residual`: the RMS over positions of ‖Uᵀc‖, c what the entry adds to the residual
    stream, in the forward the KL reads (`Evaluator.logprobs`, every position it runs) inside `edited`."""
    sums = torch.zeros(len(residual.sites), dtype=torch.float64)
    counts = torch.zeros(len(residual.sites), dtype=torch.float64)

    def record(i: int, basis: Tensor):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            along = (out.detach().float() @ basis.to(out.device)).pow(2).sum(-1)
            sums[i] += float(along.sum())
            counts[i] += along.numel()
        return hook

    model = evaluator.family.model
    with edited or nullcontext():  # the recording hooks go on after the edit's own: they see what it leaves
        handles = [model.get_submodule(name).register_forward_hook(record(i, basis))
                   for i, (name, basis) in enumerate(zip(residual.sites, residual.bases))]
        try:
            evaluator.logprobs(prompts)
        finally:
            for handle in handles:
                handle.remove()
    return (sums / counts).sqrt().float()


def gap_rows(family: Family, residual: ProjectionEdit, before: Tensor, weight: Tensor, at_residual: Tensor
             ) -> list[dict]:
    """One row per residual entry: its layer, λ, the unedited component along U and what each form leaves of it."""
    layer_of = {family.residual_entry(s): s.layer for s in family.writer_sites(kinds=SITE_KINDS)}
    return [{"entry": name, "layer": layer_of[name], "strength": float(lam), "along_before": float(b),
             "weight_form_left": float(w / b), "residual_form_left": float(a / b)}
            for name, lam, b, w, a in zip(residual.sites, residual.strengths, before, weight, at_residual)]


def format_gap_table(rows: Iterable[dict]) -> str:
    lines = [f"{'layer':>5}  {'entry':<28} {'λ':>5}  {'along U before':>14}  {'left: weight form':>17}  "
             f"{'left: residual form':>19}"]
    for r in rows:
        lines.append(f"{r['layer']:>5}  {r['entry'].rsplit('.', 1)[-1]:<28} {r['strength']:>5.2f}  "
                     f"{r['along_before']:>14.4f}  {100 * r['weight_form_left']:>16.1f}%  "
                     f"{100 * r['residual_form_left']:>18.1f}%")
    return "\n".join(lines)
