"""Where an edit acts, layer by layer: which subspace to compare with the residual entering layer l."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from subspace.analysis.statistics import span
from subspace.families.base import SITE_KINDS, Family
from subspace.interventions.edit import ProjectionEdit


@dataclass
class LayerBases:
    """For each residual layer l: an orthonormal basis [d, r] (zero-padded to a common r) of the edit's
    subspace at the edited layer nearest to l (`source[l]`); `edited` lists the layers the edit touches."""

    bases: Tensor  # [num_layers, d, r]
    source: list[int]
    edited: list[int]


def check_edit_fits(edit: ProjectionEdit, family: Family) -> dict[str, int]:
    """Each edit site's decoder layer; fails naming the sites or width that do not belong to this model."""
    if not edit.sites:
        raise ValueError("the edit has no sites: there is no subspace to compare with")
    layer_of = {site.name: site.layer for site in family.writer_sites(kinds=SITE_KINDS)}
    unknown = [s for s in edit.sites if s not in layer_of]
    if unknown:
        raise ValueError(f"edit sites {unknown[:3]}{' …' if len(unknown) > 3 else ''} are not residual writers of "
                         f"{type(family.model).__name__} (e.g. {next(iter(layer_of))!r}); was the edit made for "
                         "another model?")
    if edit.bases.shape[1] != family.hidden_size:
        raise ValueError(f"edit bases have width {edit.bases.shape[1]} but the model's hidden size is "
                         f"{family.hidden_size}; was the edit made for another model?")
    return {s: layer_of[s] for s in edit.sites}


def layer_bases(edit: ProjectionEdit, family: Family) -> LayerBases:
    """The edit's subspace per residual layer: the span of all its sites' bases at the nearest edited layer
    (exact layer first, ties to the earlier one, whose writers already wrote into that residual)."""
    site_layers = check_edit_fits(edit, family)
    edited = sorted(set(site_layers.values()))
    per_layer = {layer: span(edit.bases[[i for i, s in enumerate(edit.sites) if site_layers[s] == layer]])
                 for layer in edited}
    width = max(b.shape[1] for b in per_layer.values())
    padded = {layer: torch.cat([b, b.new_zeros(b.shape[0], width - b.shape[1])], dim=1)
              for layer, b in per_layer.items()}
    source = [min(edited, key=lambda e: (abs(e - l), e)) for l in range(family.num_layers)]
    return LayerBases(torch.stack([padded[s] for s in source]), source, edited)
