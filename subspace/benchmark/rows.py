"""One benchmark row: what the README table shows for a method on an organism."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

COLUMNS = ("organism", "method", "refusal_before", "refusal_after", "harmless_refusal_after", "kl", "wall_s",
           "trials_or_steps", "command", "note")


@dataclass
class Row:
    """A measured row; a method that could not run has `note` saying why and no numbers."""

    organism: str
    method: str
    command: str
    refusal_before: float | None = None
    refusal_after: float | None = None
    harmless_refusal_after: float | None = None
    kl: float | None = None
    wall_s: float | None = None
    trials_or_steps: str | None = None
    note: str | None = None
    n_harmful: int | None = None
    n_harmless: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def tail(path: Path, lines: int = 15) -> str:
    """The end of a log, for a row that failed: the error is usually there."""
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def effort(metrics: dict[str, Any]) -> str:
    """Trials (layers scanned) for diff_means, optimiser steps for the subspace."""
    if "steps" in metrics:
        return f"{metrics['steps']} steps"
    if "trials" in metrics:
        return f"{metrics['trials']} layers scanned"
    return "1 (no search)"


def train_row(organism: str, method: str, overrides: Sequence[str], run_dir: Path, repo_root: Path) -> Row:
    """Run `train.py` as its own process (exactly the command the README shows) and read its metrics.json."""
    args = [f"model={organism}", f"method={method}", *overrides]
    command = "python train.py " + " ".join(shlex.quote(a) for a in args)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    start = time.time()
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "train.py", *args, f"hydra.run.dir={run_dir}"], cwd=repo_root,
                              stdout=out, stderr=subprocess.STDOUT)
    wall = time.time() - start
    metrics_path = run_dir / "metrics.json"
    if done.returncode != 0 or not metrics_path.exists():
        return Row(organism, method, command, wall_s=wall,
                   note=f"train.py exited with {done.returncode}; log {log}:\n{tail(log)}")
    m = json.loads(metrics_path.read_text())
    return Row(organism, method, command, m["refusal_rate_before"], m["refusal_rate_after"],
               m["harmless_refusal_rate_after"], m["kl"], wall, effort(m), n_harmful=m["n_harmful"],
               n_harmless=m["n_harmless"])


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def markdown_table(rows: Sequence[Row], kl_at: str) -> str:
    """The README table: refusal before → after on harmful, harmless refusal after, KL, time, effort, command."""
    lines = [f"| organism | method | harmful refusal before → after | harmless refusal after | KL ({kl_at}) "
             "| wall time | trials / steps | command |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.note and r.refusal_after is None:
            lines.append(f"| {r.organism} | {r.method} | not measured: {r.note.splitlines()[0]} | | | | | "
                         f"`{r.command}` |")
            continue
        kl = "—" if r.kl is None else f"{r.kl:.3f}"
        wall = "—" if r.wall_s is None else f"{r.wall_s / 60:.1f} min"
        lines.append(f"| {r.organism} | {r.method} | {_percent(r.refusal_before)} → {_percent(r.refusal_after)} | "
                     f"{_percent(r.harmless_refusal_after)} | {kl} | {wall} | {r.trials_or_steps or '—'} | "
                     f"`{r.command}` |")
    return "\n".join(lines) + "\n"
