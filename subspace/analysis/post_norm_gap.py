"""The post-norm gap: how much of an edit's direction a weight-form edit leaves in the residual stream.

An edit `W ← (I − λUUᵀ)W` on a residual writer removes λ of the writer's output along U. In a pre-norm block that
output joins the residual stream as it is, so the weight form *is* the projection of the residual stream's
increment. In a post-norm block (DiffusionGemma) the output is RMS-normalised and scaled per channel first, which
turns some of what is left back towards U: the weight form then leaves more along U than the projection it stands
for. This module gives both forms of one edit and measures, layer by layer, the component along U of what each
layer adds to the residual stream, relative to the unedited model's.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from contextlib import nullcontext
from typing import Iterable, Sequence

import torch
from torch import Tensor

from subspace.analysis.edit_layers import check_edit_fits
from subspace.families.base import SITE_KINDS, Family
from subspace.interventions.edit import ProjectionEdit

log = logging.getLogger(__name__)


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


def _capture(family: Family, entries: Sequence[str]) -> tuple[dict[str, list[Tensor]], list]:
    """Forward hooks on the residual entries recording their outputs (float32 CPU, one tensor per batch)."""
    outputs: dict[str, list[Tensor]] = {name: [] for name in entries}
    handles = []
    for name in entries:
        def hook(module, args, output, name=name):
            out = output[0] if isinstance(output, tuple) else output
            outputs[name].append(out.detach().float().cpu())
        handles.append(family.model.get_submodule(name).register_forward_hook(hook))
    return outputs, handles


@torch.no_grad()
def along_edit(family: Family, tokenizer, prompts: Sequence[str], residual: ProjectionEdit,
               edited=None, batch_size: int = 16) -> Tensor:
    """Per residual entry of `residual`: the RMS over tokens of ‖Uᵀc‖, c what the entry adds to the residual
    stream, on the forward the KL reads (`family.response_logprobs`), inside `edited` (a context manager or None)."""
    with edited or nullcontext():
        outputs, handles = _capture(family, residual.sites)  # after the edit's hooks: records what they leave
        try:
            for start in range(0, len(prompts), batch_size):
                family.response_logprobs(family.chat_batch(tokenizer, prompts[start:start + batch_size]))
        finally:
            for handle in handles:
                handle.remove()
    rms = []
    for name, basis in zip(residual.sites, residual.bases):
        tokens = torch.cat([o.reshape(-1, o.shape[-1]) for o in outputs[name]])
        rms.append((tokens @ basis).pow(2).sum(-1).mean().sqrt())
    return torch.stack(rms)


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
