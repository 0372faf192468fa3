"""The stated rule that picks one point of a trade-off (a search's Pareto front, a set of settings) using the
selection split only: among points whose refusal rate is within the budget, the lowest KL; if none is within it,
the lowest refusal rate. It is the rule the project's defaults were chosen by (README, Results)."""

from __future__ import annotations

from typing import Sequence, TypeVar

T = TypeVar("T")
REFUSAL_BUDGET = 0.05  # the budget the defaults were chosen with; a plan may state another


def pick_point(points: Sequence[T], refusal: Sequence[float], kl: Sequence[float], refusal_budget: float) -> T:
    if not points:
        raise ValueError("pick_point needs at least one point")
    if not len(points) == len(refusal) == len(kl):
        raise ValueError(f"{len(points)} points but {len(refusal)} refusal rates and {len(kl)} KLs")
    within = [i for i in range(len(points)) if refusal[i] <= refusal_budget]
    best = (min(within, key=lambda i: (kl[i], refusal[i])) if within
            else min(range(len(points)), key=lambda i: (refusal[i], kl[i])))
    return points[best]
