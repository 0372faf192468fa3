"""What train.py returns: the sweeper's objectives, named by `optimized_metrics`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def sweep_objectives(metrics: Mapping[str, Any], names: Sequence[str], multirun: bool) -> float | tuple | None:
    """The named metrics of a finished run: one float, or a tuple for a multi-objective sweeper.

    A single run returns None when they are missing (a run without a selection split is fine on its own);
    a sweep cannot optimise what was not measured, so there it is an error that says why.
    """
    missing = [name for name in names if name not in metrics]
    if missing and multirun:
        raise ValueError(f"optimized_metrics {missing} were not measured by this run: the select_* metrics need "
                         "the held-back selection split (data.n_select > 0 and eval.on_select=true)")
    if missing:
        return None
    values = tuple(float(metrics[name]) for name in names)
    return values[0] if len(values) == 1 else values
