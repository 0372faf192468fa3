"""Learn an edit that removes refusal: `python train.py [model=...] [method=...] [key=value ...]`."""

from __future__ import annotations

from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from subspace.config import register_resolvers
from subspace.sweeps.objectives import sweep_objectives

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> Any:
    from subspace.pipeline import run  # heavy imports after Hydra has parsed the command line

    metrics = run(cfg)
    return sweep_objectives(metrics, cfg.optimized_metrics, HydraConfig.get().mode == RunMode.MULTIRUN)


if __name__ == "__main__":
    main()
