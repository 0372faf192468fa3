"""Learn an edit that removes refusal: `python train.py [model=...] [method=...] [key=value ...]`."""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from subspace.config import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> Any:
    from subspace.pipeline import run  # heavy imports after Hydra has parsed the command line

    metrics = run(cfg)
    objectives = [metrics[name] for name in cfg.optimized_metrics]
    return objectives[0] if len(objectives) == 1 else tuple(objectives)


if __name__ == "__main__":
    main()
