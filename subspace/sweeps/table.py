"""The Pareto table of a finished sweep: printed, and saved as pareto.csv and pareto.json in the sweep directory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from subspace.sweeps.pareto import pareto_front
from subspace.sweeps.trials import Trial, load_trials, searched_params
from subspace.utils.io import write_csv, write_json

log = logging.getLogger(__name__)


def param_columns(trials: list[Trial], searched: list[str]) -> list[str]:
    """The sweeper's search space, then every other override whose value differs between trials: what the sweep
    chose. Overrides shared by all trials (model=..., debug=...) say nothing about a trial and are left out."""
    keys = list(dict.fromkeys(key for t in trials for key in t.params))
    varying = [key for key in keys if len({t.params.get(key) for t in trials}) > 1]
    return list(dict.fromkeys([*searched, *varying]))


def front_rows(trials: list[Trial], objectives: list[str], params: list[str]) -> list[dict[str, Any]]:
    """One row per non-dominated finished trial (its name, objectives, `params`), sorted by the objectives."""
    finished = [t for t in trials if t.values is not None]
    front = [finished[i] for i in pareto_front([t.values for t in finished])]
    front.sort(key=lambda t: t.values)
    return [{"trial": t.name} | dict(zip(objectives, t.values)) | {k: t.params.get(k) for k in params}
            for t in front]


def write_front(sweep_dir: Path, rows: list[dict[str, Any]], objectives: list[str], n_trials: int,
                n_finished: int) -> None:
    write_csv(sweep_dir / "pareto.csv", rows)
    write_json(sweep_dir / "pareto.json", {"objectives": objectives, "direction": "minimize",
                                           "n_trials": n_trials, "n_finished": n_finished, "front": rows})


def _cell(value: Any) -> str:
    """Four significant digits for numbers, sampled floats included (their strings are as long as repr)."""
    try:
        return f"{float(value):.4g}" if isinstance(value, float) or "." in str(value) else str(value)
    except ValueError:
        return str(value)


def print_front(rows: list[dict[str, Any]], title: str, console: Console | None = None) -> None:
    table = Table(title=title)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    for column in columns:
        table.add_column(column, justify="left" if column == "trial" else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    (console or _console()).print(table)


def _console() -> Console:
    """The terminal's width, or a wide one when output goes to a file (a log keeps whole column names)."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


def report_sweep(sweep_dir: str | Path, objectives: list[str], console: Console | None = None) -> list[dict]:
    """Read every trial of `sweep_dir`, then print and save the Pareto front over `objectives` (all minimised)."""
    sweep_dir = Path(sweep_dir)
    trials = load_trials(sweep_dir, objectives)
    n_finished = sum(t.values is not None for t in trials)
    if not n_finished:
        log.warning("no finished trial in %s: no Pareto table written", sweep_dir)
        return []
    rows = front_rows(trials, objectives, param_columns(trials, searched_params(sweep_dir, trials)))
    write_front(sweep_dir, rows, objectives, len(trials), n_finished)
    print_front(rows, f"Pareto front (all minimised): {len(rows)} of {n_finished} finished trials", console)
    (console or _console()).print(f"saved {sweep_dir / 'pareto.csv'} and pareto.json")
    return rows
