"""Where refusal lives: per-layer statistics of harmful vs harmless residuals, before and after an edit."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from subspace.analysis.collect import ClassResiduals, class_residuals
from subspace.analysis.edit_layers import LayerBases, layer_bases
from subspace.analysis.statistics import captured_share, probe_accuracy
from subspace.families.base import Family
from subspace.interventions.edit import ProjectionEdit

Table = dict[str, list]  # column name → one value per layer (None where undefined)


@dataclass
class ProbeSettings:
    """The held-out linear probe (see `probe_accuracy`)."""

    train_fraction: float = 0.5
    l2: float = 1e-2
    seed: int = 0


@dataclass
class Geometry:
    """The per-layer table and the residuals the PCA plots draw; `after` only when an edit was given."""

    before: ClassResiduals
    table: Table
    meta: dict[str, Any]
    after: ClassResiduals | None = None
    edited_layers: list[int] = field(default_factory=list)


def _values(x: torch.Tensor) -> list[float | None]:
    return [None if math.isnan(v) else v for v in x.tolist()]


def class_statistics(residuals: ClassResiduals, probe: ProbeSettings) -> Table:
    """cosine of the class means, ‖r_l‖ and held-out probe accuracy per layer."""
    means = residuals.means
    return {"cosine": _values(means.cosine), "diff_norm": _values(means.difference.norm(dim=-1)),
            "probe_accuracy": _values(probe_accuracy(residuals.harmful, residuals.harmless, **asdict(probe)))}


def separating_layer(cosine: Sequence[float | None]) -> int:
    """The layer where the class means are least alike (the dip of the separation curve)."""
    defined = [(c, l) for l, c in enumerate(cosine) if c is not None]
    if not defined:
        raise ValueError("every layer's class-mean cosine is undefined (zero class means?)")
    return min(defined)[1]


def layer_table(before: ClassResiduals, after: ClassResiduals | None = None, bases: LayerBases | None = None,
                reference_layer: int | None = None, probe: ProbeSettings | None = None) -> tuple[Table, int]:
    """The per-layer table and the reference layer whose r̂ gives `direction_share`.

    `direction_share` = share of r_l held by r̂ of the reference layer (what a one-direction ablation removes);
    `subspace_share_*` = ‖U Uᵀ r_l‖/‖r_l‖ with U the edit's subspace nearest layer l (`basis_layer`); it describes
    the subspace, not how much of it the strengths λ remove (the `*_after` columns show that).
    """
    probe = probe or ProbeSettings()
    stats = class_statistics(before, probe)
    reference = separating_layer(stats["cosine"]) if reference_layer is None else reference_layer
    if not -before.num_layers <= reference < before.num_layers:
        raise ValueError(f"reference_layer={reference} is out of range for {before.num_layers} layers")
    reference %= before.num_layers
    difference = before.means.difference
    direction = torch.nn.functional.normalize(difference[reference], dim=-1).unsqueeze(-1)
    table: Table = {"layer": list(range(before.num_layers))}
    table |= {f"{name}_before": values for name, values in stats.items()}
    table["direction_share"] = _values(captured_share(difference, direction))
    if after is not None:
        table |= {f"{name}_after": values for name, values in class_statistics(after, probe).items()}
    if bases is not None:
        table["basis_layer"] = list(bases.source)
        table["subspace_share_before"] = _values(captured_share(difference, bases.bases))
        if after is not None:
            table["subspace_share_after"] = _values(captured_share(after.means.difference, bases.bases))
    return table, reference


def measure(family: Family, tokenizer: PreTrainedTokenizerBase, harmful: Sequence[str], harmless: Sequence[str],
            edit: ProjectionEdit | None = None, batch_size: int = 16, system_prompt: str | None = None,
            reference_layer: int | None = None, probe: ProbeSettings | None = None) -> Geometry:
    """Read both classes' residuals from the model as it is, and inside `edit.applied` when an edit is given."""
    bases = layer_bases(edit, family) if edit is not None else None  # checks the edit fits before any forward pass
    before = class_residuals(family, tokenizer, harmful, harmless, batch_size, system_prompt, " (before)")
    after = None
    if edit is not None:
        with edit.applied(family.model):
            after = class_residuals(family, tokenizer, harmful, harmless, batch_size, system_prompt, " (after)")
    table, reference = layer_table(before, after, bases, reference_layer, probe)
    meta = {"family": family.name, "num_layers": family.num_layers, "hidden_size": family.hidden_size,
            "n_harmful": len(harmful), "n_harmless": len(harmless), "reference_layer": reference,
            "probe": asdict(probe or ProbeSettings()), "edit": None}
    if edit is not None:
        meta["edit"] = {"sites": len(edit.sites), "rank": edit.rank, "edited_layers": bases.edited,
                        "strength_mean": float(edit.strengths.mean()), "meta": edit.meta}
    return Geometry(before, table, meta, after, bases.edited if bases is not None else [])
