"""`python -m subspace.sweeps.seed SWEEP_DIR STORAGE`: a finished Optuna sweep's trials, put into an Optuna study.

A sweep run without `hydra.sweeper.storage` keeps its study in memory, so asking for more trials later would
run the first ones again (the sampler is seeded and the runs are deterministic). This writes every finished trial
of the sweep directory (its overrides and the objectives in its metrics.json) into STORAGE under the sweep's study
name; then `python train.py hparams_search=... hydra.sweeper.storage=STORAGE hydra.sweeper.n_trials=N` runs N
new trials, the sampler modelling the old ones. Needs the `sweeps` extra (hydra-optuna-sweeper).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from subspace.sweeps.trials import load_trials


def sweeper_settings(sweep_dir: Path, job: str) -> dict:
    """`hydra.sweeper` as a job of the sweep recorded it (search space, directions, study name)."""
    hydra_cfg = OmegaConf.load(sweep_dir / job / ".hydra" / "hydra.yaml")
    return OmegaConf.to_container(hydra_cfg.hydra.sweeper, resolve=False)


def seed_study(sweep_dir: str | Path, storage: str, objectives: list[str], study_name: str | None = None) -> int:
    """Add the sweep's finished trials to the study (created if missing); the number added. A study that already
    holds trials is refused: seeding twice would count every trial twice."""
    import optuna
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    sweep_dir = Path(sweep_dir)
    finished = [t for t in load_trials(sweep_dir, objectives) if t.values is not None]
    if not finished:
        raise ValueError(f"no finished trial (metrics.json with {objectives}) under {sweep_dir}")
    sweeper = sweeper_settings(sweep_dir, finished[0].name)
    if not sweeper.get("params"):
        raise ValueError(f"{sweep_dir} is not an Optuna sweep: its jobs record no hydra.sweeper.params")
    distributions, _ = create_params_from_overrides([f"{k}={v}" for k, v in sweeper["params"].items()])
    name = study_name or sweeper["study_name"]
    study = optuna.create_study(study_name=name, storage=storage, directions=sweeper["direction"],
                                load_if_exists=True)
    if study.trials:
        raise ValueError(f"study {name!r} in {storage} already holds {len(study.trials)} trials; seed a new one")
    parser = OverridesParser.create()
    for trial in finished:
        params = {key: parser.parse_override(f"{key}={trial.params[key]}").value() for key in distributions}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, values=list(trial.values)))
    return len(finished)


def main(argv: list[str] | None = None) -> None:
    from subspace.sweeps.__main__ import recorded_objectives

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("storage", help="an Optuna storage URL, e.g. sqlite:///subspace.db")
    parser.add_argument("--study-name", help="default: the sweep's hydra.sweeper.study_name")
    args = parser.parse_args(argv)
    added = seed_study(args.sweep_dir, args.storage, recorded_objectives(args.sweep_dir), args.study_name)
    print(f"{added} trials of {args.sweep_dir} added to {args.storage}")


if __name__ == "__main__":
    main()
