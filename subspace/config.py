"""OmegaConf resolvers used by `conf/`: where the project and the public prompt splits live, and whether this run is
one job of a sweep."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """`$SUBSPACE_SHARED_DATA`, else `../shared/data` beside the project (the public splits, never copied in)."""
    return Path(os.environ.get("SUBSPACE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_or(relative: str, fallback: str, skip: int = 0) -> str | dict:
    """The public split `relative` when the shared data folder exists, else the project's own `fallback` set.

    `skip` > 0 drops the split's first prompts (as a `{path, skip}` source): those the organism
    was trained on. The choice is logged and recorded in metrics.json (data sources), never silent.
    """
    path = shared_data_dir() / relative
    if path.exists():
        return {"path": str(path), "skip": skip} if skip else str(path)
    log.warning("public split %s not found; using the project's own set %s", path, fallback)
    return fallback


def sweeping() -> bool:
    """Whether this run is a job of a Hydra multirun (`--multirun`); False outside Hydra (the compose API, tests)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def register_resolvers() -> None:
    for name, fn in (("repo_root", lambda: str(REPO_ROOT)), ("shared_or", shared_or), ("sweeping", sweeping)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
