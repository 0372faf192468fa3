"""A Hydra callback: at the end of every multirun, the Pareto table of its trials (see `subspace.sweeps.table`)."""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from subspace.sweeps.table import report_sweep


class ParetoFront(Callback):
    """Configured under `hydra.callbacks` with `objectives: ${optimized_metrics}`; single runs are untouched."""

    def __init__(self, objectives: list[str]) -> None:
        self.objectives = list(objectives)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        report_sweep(config.hydra.sweep.dir, self.objectives)
