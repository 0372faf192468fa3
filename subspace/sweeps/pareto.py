"""Non-dominated points over several objectives, all minimised (train.py's refusal rate and KL).

A sweep over two objectives has no single best trial; the useful answer is every trial that no other
trial beats on all objectives at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """`a` is no worse than `b` on every objective and strictly better on at least one."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b))


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points, in input order.

    Equal points do not dominate each other, so a tie on the front keeps every trial in it. A point with a
    NaN cannot be compared (every comparison is false, so it would never be dominated) and is left out.
    """
    if len({len(p) for p in points}) > 1:
        raise ValueError(f"points have different numbers of objectives: {sorted({len(p) for p in points})}")
    valid = [i for i, p in enumerate(points) if not any(math.isnan(x) for x in p)]
    return [i for i in valid if not any(dominates(points[j], points[i]) for j in valid if j != i)]
