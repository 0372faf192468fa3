"""The trials of a sweep directory: each job's overrides (`.hydra/overrides.yaml`) and objectives (`metrics.json`).

Read from disk rather than from the sweeper, so the same table comes out of the basic sweeper, Optuna, any
launcher, and a sweep that was interrupted.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trial:
    name: str                          # the job directory relative to the sweep directory (the job number)
    params: dict[str, str]             # its overrides, key → value as on the command line
    values: tuple[float, ...] | None   # the objectives from metrics.json; None: failed or unfinished


def read_overrides(job_dir: Path) -> dict[str, str]:
    lines = OmegaConf.to_container(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml"), resolve=False) or []
    return dict(line.split("=", 1) if "=" in line else (line, "") for line in lines)


def read_objectives(metrics_path: Path, objectives: list[str]) -> tuple[float, ...]:
    metrics = json.loads(metrics_path.read_text())
    missing = [name for name in objectives if name not in metrics]
    if missing:
        raise ValueError(f"{metrics_path} has no {missing}: its run did not measure the objectives "
                         f"(available: {sorted(k for k in metrics if k.startswith('select_'))})")
    return tuple(float(metrics[name]) for name in objectives)


def searched_params(sweep_dir: Path, trials: list[Trial]) -> list[str]:
    """The keys of the sweeper's `hydra.sweeper.params` (its search space), as the first trial recorded them."""
    if not trials:
        return []
    hydra_cfg = OmegaConf.load(Path(sweep_dir) / trials[0].name / ".hydra" / "hydra.yaml")
    return [str(key) for key in OmegaConf.select(hydra_cfg, "hydra.sweeper.params", default=None) or {}]


def _order(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in name.split("/")), name


def load_trials(sweep_dir: str | Path, objectives: list[str]) -> list[Trial]:
    """Every job under `sweep_dir` (a directory holding `.hydra/overrides.yaml`), in job order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    trials = []
    for overrides in sweep_dir.glob("**/.hydra/overrides.yaml"):
        job_dir = overrides.parent.parent
        metrics = job_dir / "metrics.json"
        values = read_objectives(metrics, objectives) if metrics.exists() else None
        trials.append(Trial(job_dir.relative_to(sweep_dir).as_posix(), read_overrides(job_dir), values))
    unfinished = [t.name for t in trials if t.values is None]
    if unfinished:
        log.warning("%d trial(s) in %s have no metrics.json (failed or unfinished): %s", len(unfinished),
                    sweep_dir, ", ".join(sorted(unfinished, key=_order)))
    return sorted(trials, key=lambda t: _order(t.name))
