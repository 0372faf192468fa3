"""`method.moe_scope`: which parts of a mixture-of-experts layer an edit reaches.

- `all_experts`: every expert's down-projection slice (and a shared expert's), so the direction is gone
  whichever experts the router picks later;
- `active_only`: only the experts that fired (top-k routing) on the calibration prompts, the training prompts
  the method reads anyway; an expert that did not fire keeps the direction, and the router can route to it;
- `layer_output`: the MoE block's combined output, projected by a hook (activation form only), expert
  weights untouched.

Attention outputs and dense layers' MLPs are edited the same way in every scope. A dense model has no
MoE layer, so the setting has nothing to act on there: a scope other than the default is logged and ignored.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Sequence

from torch import Tensor

from subspace.families.base import Family, WriterSite

log = logging.getLogger(__name__)
MOE_SCOPES = ("all_experts", "active_only", "layer_output")


def check_moe_scope(scope: str) -> str:
    if scope not in MOE_SCOPES:
        raise ValueError(f"method.moe_scope={scope!r} is not one of {MOE_SCOPES}")
    return scope


@dataclass
class ScopedSites:
    """The sites an edit writes, and for stacked experts edited in part, which experts (bool [num_experts])."""

    sites: list[WriterSite]
    expert_masks: dict[str, Tensor]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]


def calibration(family: Family, scope: str) -> AbstractContextManager[dict[str, Tensor]]:
    """Wrap the method's forwards on its training prompts: for active_only, records the experts that fire."""
    if scope == "active_only" and family.moe_blocks:
        return family.recorded_routing()
    return nullcontext({})


def scoped_sites(family: Family, layers: Sequence[int] | None, scope: str,
                 fired: dict[str, Tensor] | None = None) -> ScopedSites:
    """The writer sites of `layers` for `scope`; `fired` is what `calibration` recorded (active_only)."""
    check_moe_scope(scope)
    if not family.moe_blocks:
        if scope != "all_experts":
            log.warning("method.moe_scope=%s is ignored: %s has no mixture-of-experts layer", scope,
                        type(family.model).__name__)
        return ScopedSites(family.writer_sites(layers), {})
    if scope == "layer_output":
        return ScopedSites(family.writer_sites(layers, kinds=("attn_out", "mlp_out", "moe_out")), {})
    sites = family.writer_sites(layers)
    if scope == "all_experts":
        return ScopedSites(sites, {})
    if not fired:
        raise ValueError("method.moe_scope=active_only needs the experts that fired on the calibration prompts; "
                         "run the method's forwards inside `calibration(family, scope)`")
    kept = [s for s in sites if s.expert is None or bool(fired[s.experts][s.expert])]
    masks = {s.name: fired[s.experts].clone() for s in kept if s.kind == "expert_out" and s.expert is None}
    experts = {s.experts for s in sites if s.kind == "expert_out"}
    log.info("moe_scope=active_only: %d of %d experts fired on the calibration prompts and are edited",
             sum(int(fired[e].sum()) for e in experts), sum(len(fired[e]) for e in experts))
    return ScopedSites(kept, masks)
