"""The stated rule that picks one point of a trade-off (a search's Pareto front) for the table, using the
selection split only: the lowest refusal rate among points within the KL budget; none within it → lowest KL."""

from __future__ import annotations

from typing import Sequence, TypeVar

T = TypeVar("T")


def pick_point(points: Sequence[T], refusal: Sequence[float], kl: Sequence[float], kl_budget: float) -> T:
    if not points:
        raise ValueError("pick_point needs at least one point")
    if not len(points) == len(refusal) == len(kl):
        raise ValueError(f"{len(points)} points but {len(refusal)} refusal rates and {len(kl)} KLs")
    within = [i for i in range(len(points)) if kl[i] <= kl_budget]
    best = (min(within, key=lambda i: (refusal[i], kl[i])) if within
            else min(range(len(points)), key=lambda i: (kl[i], refusal[i])))
    return points[best]
