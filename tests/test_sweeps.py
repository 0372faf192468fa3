"""Sweeps: the Pareto front on hand-made points, the table from a sweep directory, and real multiruns of train.py
on the tiny organism with the Optuna sweeper and the joblib launcher (seconds each)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

from subspace.config import register_resolvers
from subspace.sweeps.objectives import sweep_objectives
from subspace.sweeps.pareto import dominates, pareto_front
from subspace.sweeps.table import report_sweep
from tests.conftest import ROOT, run_train

OBJECTIVES = ["select_refusal_rate_after", "select_kl"]
needs_plugins = pytest.mark.skipif(
    find_spec("hydra_plugins.hydra_optuna_sweeper") is None or find_spec("hydra_plugins.hydra_joblib_launcher") is None,
    reason="the sweep plugins are not installed: pip install -e '.[sweeps]'")


def test_pareto_front_excludes_dominated_points_and_keeps_ties():
    points = [(0.1, 0.5), (0.2, 0.2), (0.1, 0.5),  # 0 and 2 tie: both on the front
              (0.2, 0.3),                          # equal refusal, worse KL than 1: dominated
              (0.5, 0.1), (0.6, 0.6), (0.1, 0.6),  # 5 dominated by all; 6 by 0 (equal refusal, worse KL)
              (math.nan, 0.0)]                     # cannot be compared: never on the front
    assert pareto_front(points) == [0, 1, 2, 4]
    assert pareto_front([(1.0, 1.0)]) == [0] and pareto_front([]) == []
    assert not dominates((0.1, 0.5), (0.1, 0.5))
    with pytest.raises(ValueError, match="different numbers of objectives"):
        pareto_front([(0.1, 0.2), (0.3,)])


@given(st.lists(st.tuples(st.sampled_from([0.0, 0.25, 0.5, 1.0]), st.floats(0, 1)), max_size=20))
def test_pareto_front_is_exactly_the_undominated_points(points):
    front = pareto_front(points)
    for i, p in enumerate(points):
        assert (i in front) == (not any(dominates(q, p) for q in points))


def test_sweep_objectives_single_and_multi():
    metrics = {"select_refusal_rate_after": 0.25, "select_kl": 0.1, "kl": 0.2}
    assert sweep_objectives(metrics, OBJECTIVES, multirun=True) == (0.25, 0.1)
    assert sweep_objectives(metrics, ["kl"], multirun=True) == 0.2
    assert sweep_objectives({"kl": 0.2}, OBJECTIVES, multirun=False) is None  # a run without a selection split
    with pytest.raises(ValueError, match="data.n_select > 0"):
        sweep_objectives({"kl": 0.2}, OBJECTIVES, multirun=True)


def test_a_single_run_measures_the_selection_split_when_asked(tmp_path, cache_dir, tiny_organism):
    """Sweeps measure it in every job (test_multirun_*); a single run only with eval.on_select=true, and without a
    selection split (data.n_select=0) it has nothing to return to a sweeper, which is not an error."""
    (tmp_path / "asked").mkdir(), (tmp_path / "none").mkdir()
    metrics = run_train(tmp_path / "asked", cache_dir, "eval.on_select=true")
    assert {"select_refusal_rate_after", "select_answer_rate_after", "select_kl"} <= metrics.keys()
    metrics = run_train(tmp_path / "none", cache_dir, "eval.on_select=true", "data.n_select=0")
    assert "select_kl" not in metrics and "kl" in metrics


def fake_trial(sweep: Path, name: str, overrides: list[str], values: tuple[float, float] | None) -> None:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"sweeper": {"params": {"method.rank": "choice(1,2)"}}}}),
                   job / ".hydra" / "hydra.yaml")
    if values is not None:
        (job / "metrics.json").write_text(json.dumps(dict(zip(OBJECTIVES, values)) | {"kl": 9.0}))


def test_report_sweep_writes_the_front_of_the_finished_trials(tmp_path):
    for i, (rank, kl_weight, values) in enumerate([(1, 1, (0.5, 0.1)), (1, 2, (0.0, 0.3)), (2, 2, (0.5, 0.2)),
                                                   (2, 1, (0.0, 0.3)), (2, 3, None)]):
        fake_trial(tmp_path, str(i), [f"method.rank={rank}", f"objective.kl_weight={kl_weight}", "debug=fast"], values)
    rows = report_sweep(tmp_path, OBJECTIVES)
    # 2 is dominated by 0; 1 and 3 tie; 4 has no metrics.json; debug=fast is the same everywhere
    expected = [{"trial": "1", "select_refusal_rate_after": 0.0, "select_kl": 0.3, "method.rank": "1",
                 "objective.kl_weight": "2"},
                {"trial": "3", "select_refusal_rate_after": 0.0, "select_kl": 0.3, "method.rank": "2",
                 "objective.kl_weight": "1"},
                {"trial": "0", "select_refusal_rate_after": 0.5, "select_kl": 0.1, "method.rank": "1",
                 "objective.kl_weight": "1"}]
    assert rows == expected
    saved = json.loads((tmp_path / "pareto.json").read_text())
    assert saved["front"] == expected and saved["n_trials"] == 5 and saved["n_finished"] == 4
    with (tmp_path / "pareto.csv").open() as f:
        assert [row["trial"] for row in csv.DictReader(f)] == ["1", "3", "0"]


def test_report_sweep_names_a_trial_without_the_objectives(tmp_path):
    fake_trial(tmp_path, "0", ["method.rank=1"], None)
    (tmp_path / "0" / "metrics.json").write_text(json.dumps({"kl": 0.1}))
    with pytest.raises(ValueError, match=r"0/metrics.json has no \['select_refusal_rate_after', 'select_kl'\]"):
        report_sweep(tmp_path, OBJECTIVES)


@needs_plugins
@pytest.mark.parametrize("search", ["subspace_optuna", "diff_means_optuna"])
def test_hparams_search_configs_compose(search):
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"hparams_search={search}"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.sampler.seed is not None
    assert len(sweeper.direction) == len(cfg.optimized_metrics) and set(sweeper.direction) == {"minimize"}
    assert cfg.method._target_.endswith("Subspace" if search == "subspace_optuna" else "DiffMeans")
    assert all(key.split(".")[0] in cfg for key in sweeper.params)  # every searched key exists in the config
    assert cfg.hydra.callbacks.pareto_front.objectives == cfg.optimized_metrics


def multirun(tmp_path: Path, cache_dir: Path, *overrides: str) -> Path:
    """Run `train.py --multirun` on the tiny organism as a user would; return its sweep directory."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "train.py"), "--multirun", "model=tiny_organism", "debug=fast", "logger=csv",
           f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}", *overrides]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Pareto front" in result.stdout
    return sweep


def select_values(job: Path) -> list[float]:
    metrics = json.loads((job / "metrics.json").read_text())
    return [metrics[name] for name in OBJECTIVES]


@needs_plugins
@pytest.mark.parametrize("search, extra", [("subspace_optuna", []),
                                           ("diff_means_optuna", ["method.source_layer=int(interval(0, 3))"])])
def test_optuna_search_writes_the_pareto_table_of_its_trials(tmp_path, cache_dir, tiny_organism, search, extra):
    sweep = multirun(tmp_path, cache_dir, f"hparams_search={search}", "hydra.sweeper.n_trials=2", *extra)
    trials = sorted(p.name for p in sweep.iterdir() if (p / "metrics.json").exists())
    assert trials == ["0", "1"]
    front = json.loads((sweep / "pareto.json").read_text())["front"]
    assert front and {row["trial"] for row in front} <= set(trials)
    for row in front:
        assert [row[name] for name in OBJECTIVES] == select_values(sweep / row["trial"])
    with (sweep / "pareto.csv").open() as f:
        assert [[float(row[name]) for name in OBJECTIVES] for row in csv.DictReader(f)] == \
            [[row[name] for name in OBJECTIVES] for row in front]
    # Optuna's own Pareto solutions (optimization_results.yaml) are the same points
    solutions = OmegaConf.load(sweep / "optimization_results.yaml").solutions
    assert sorted(tuple(s["values"]) for s in solutions) == sorted(tuple(row[n] for n in OBJECTIVES) for row in front)
    if search == "subspace_optuna":
        assert {"method.rank", "objective.kl_weight", "method.min_depth", "method.lr"} <= front[0].keys()
    else:
        assert 0 <= int(front[0]["method.source_layer"]) <= 3


@needs_plugins
def test_joblib_launcher_runs_two_jobs_in_parallel(tmp_path, cache_dir, tiny_organism):
    sweep = multirun(tmp_path, cache_dir, "method.rank=1,2", "hydra/launcher=joblib",
                     "hydra.launcher.n_jobs=2")
    ranks = sorted(json.loads((sweep / str(i) / "metrics.json").read_text())["rank"] for i in (0, 1))
    assert ranks == [1, 2] and (sweep / "pareto.csv").exists()


@needs_plugins
def test_seed_study_continues_a_finished_sweep_from_its_trials(tmp_path):
    import optuna

    from subspace.sweeps.seed import seed_study

    sweep = tmp_path / "sweep"
    space = {"method.rank": "choice(1, 2, 4)", "objective.kl_weight": "tag(log, interval(0.3, 10.0))"}
    for i, (rank, weight, values) in enumerate([(1, 0.5, (0.1, 0.2)), (4, 3.0, (0.0, 0.4)), (2, 1.0, None)]):
        fake_trial(sweep, str(i), [f"method.rank={rank}", f"objective.kl_weight={weight}", "debug=fast"], values)
        OmegaConf.save(OmegaConf.create({"hydra": {"sweeper": {"params": space, "study_name": "subspace",
                                                               "direction": ["minimize", "minimize"]}}}),
                       sweep / str(i) / ".hydra" / "hydra.yaml")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    assert seed_study(sweep, storage, OBJECTIVES) == 2  # trial 2 has no metrics.json
    study = optuna.load_study(study_name="subspace", storage=storage)
    assert [(t.params, t.values) for t in study.trials] == [
        ({"method.rank": 1, "objective.kl_weight": 0.5}, [0.1, 0.2]),
        ({"method.rank": 4, "objective.kl_weight": 3.0}, [0.0, 0.4])]
    with pytest.raises(ValueError, match="already holds 2 trials"):
        seed_study(sweep, storage, OBJECTIVES)
    study.sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=1)
    asked = study.ask(study.trials[0].distributions)  # the sweeper's next trial: same distributions, so TPE models them
    assert asked.params["method.rank"] in (1, 2, 4) and 0.3 <= asked.params["objective.kl_weight"] <= 10
