"""Difference-of-means direction ablation: one direction, removed from every residual writer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from subspace.interventions.edit import ProjectionEdit
from subspace.methods.base import RunContext
from subspace.methods.directions import class_means
from subspace.methods.moe_scope import ScopedSites, calibration, check_moe_scope, scoped_sites
from subspace.utils.io import write_csv

log = logging.getLogger(__name__)


@dataclass
class DiffMeans:
    """`r̂_l` from source layer `l`, projected out of every writer with strength λ.

    `source_layer="scan"` tries each layer in `scan_layers` on the held-back selection prompts
    (never the reported ones) and keeps the lowest refusal rate, ties broken by lower KL.
    `moe_scope` says what of a MoE layer is edited (see `subspace.methods.moe_scope`).
    """

    source_layer: int | str = "scan"
    strength: float = 1.0
    scan_layers: Sequence[int] | None = None
    scan_max_new_tokens: int = 24
    edit_layers: Sequence[int] | None = None
    moe_scope: str = "all_experts"
    name: str = "diff_means"

    def __post_init__(self) -> None:
        if self.strength < 0:
            raise ValueError(f"method.strength={self.strength} must be ≥ 0 (1 removes the direction fully)")
        if not (self.source_layer == "scan" or isinstance(self.source_layer, int)):
            raise ValueError(f"method.source_layer={self.source_layer!r} must be a layer index or 'scan'")
        check_moe_scope(self.moe_scope)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "rank": 1, "strength": self.strength, "source_layer": self.source_layer,
                "moe_scope": self.moe_scope}

    def edit_for(self, scoped: ScopedSites, direction: torch.Tensor, layer: int) -> ProjectionEdit:
        bases = direction.reshape(1, -1, 1).expand(len(scoped.sites), -1, -1).clone()
        return ProjectionEdit(scoped.names, bases, torch.full((len(scoped.sites),), float(self.strength)),
                              {"method": self.name, "source_layer": layer}, scoped.expert_masks)

    def fit(self, ctx: RunContext) -> ProjectionEdit:
        fam, tok = ctx.family, ctx.bundle.tokenizer
        with calibration(fam, self.moe_scope) as fired:
            means = class_means(fam, tok, ctx.data["train_harmful"], ctx.data["train_harmless"],
                                system_prompt=ctx.evaluator.system_prompt)
        scoped = scoped_sites(fam, self.edit_layers, self.moe_scope, fired)
        directions = means.directions
        ctx.report["class_mean_cosine"] = means.cosine.tolist()
        if self.source_layer != "scan":
            layer = fam.check_layer(int(self.source_layer), "method.source_layer")
        else:
            layer = self.scan(ctx, directions, scoped)
        ctx.report["source_layer"] = layer
        return self.edit_for(scoped, directions[layer], layer)

    def scan(self, ctx: RunContext, directions: torch.Tensor, scoped: ScopedSites) -> int:
        """Refusal and KL on the selection split for each candidate source layer; writes scan.csv."""
        layers = [ctx.family.check_layer(i, "method.scan_layers") for i in (self.scan_layers or range(ctx.family.num_layers))]
        harmful, harmless = ctx.data["select_harmful"], ctx.data["select_harmless"]
        if not harmful or not harmless:
            raise ValueError("method.source_layer=scan needs a selection split: set data.n_select > 0")
        reference = ctx.evaluator.logprobs(harmless)
        rows = []
        for layer in layers:
            edit = self.edit_for(scoped, directions[layer], layer)
            rate, _, _ = ctx.evaluator.refusals(harmful, edit, f"scan layer {layer}", self.scan_max_new_tokens)
            rows.append({"layer": layer, "select_refusal_rate": rate, "select_kl": ctx.evaluator.kl(harmless, edit, reference)})
            log.info("scan layer %d: refusal %.3f, KL %.3f", layer, rows[-1]["select_refusal_rate"], rows[-1]["select_kl"])
        write_csv(ctx.run_dir / "scan.csv", rows)
        best = min(rows, key=lambda r: (r["select_refusal_rate"], r["select_kl"]))
        ctx.report["scan"], ctx.report["trials"] = rows, len(rows)
        return best["layer"]
