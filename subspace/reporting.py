"""The end-of-run summary table and the records that let a result be reproduced."""

from __future__ import annotations

import platform
import subprocess
from typing import Any

from rich.console import Console
from rich.table import Table

from subspace.config import REPO_ROOT


def versions() -> dict[str, str]:
    import lightning, peft, torch, torchmetrics, transformers  # noqa: E401

    libs = {m.__name__: m.__version__ for m in (torch, transformers, peft, lightning, torchmetrics)}
    return libs | {"python": platform.python_version()}


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str | None:
    return _git("rev-parse", "HEAD") or None


def git_dirty() -> bool | None:
    """Whether tracked files differ from `git_commit` (then the commit alone does not reproduce the run)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def print_summary(metrics: dict[str, Any], warnings: list[str], console: Console | None = None) -> None:
    table = Table(title=f"subspace · {metrics.get('model')} · {metrics.get('method')}", show_header=True)
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    for split, prefix, n in (("harmful", "", metrics["n_harmful"]), ("harmless", "harmless_", metrics["n_harmless"])):
        for verdict in ("answer", "refusal", "broken"):
            key = f"{prefix}{verdict}_rate"
            if f"{key}_before" in metrics:
                table.add_row(f"{verdict} ({split}, n={n})", pct(metrics[f"{key}_before"]), pct(metrics[f"{key}_after"]))
        if f"{prefix}marker_refusal_rate_before" in metrics:
            table.add_row(f"  marker judge's refusal ({split})", pct(metrics[f"{prefix}marker_refusal_rate_before"]),
                          pct(metrics[f"{prefix}marker_refusal_rate_after"]))
    table.add_row(f"KL(original ‖ edited), {metrics.get('kl_at', 'first token')}", "", f"{metrics['kl']:.4f}")
    if "kl_response" in metrics:
        table.add_row(f"KL over the first {metrics['kl_response_tokens']} answer tokens", "", f"{metrics['kl_response']:.4f}")
    table.add_row("wall time", "", f"{metrics['wall_time_s']:.0f} s")
    console = console or Console()
    console.print(table)
    if metrics.get("tuned_settings"):
        console.print(f"settings: {metrics['method']} with {metrics['tuned_settings']} applied over conf/method and conf/objective")
    console.print(f"judge: {metrics.get('judge')}, {metrics.get('max_new_tokens')} new tokens · "
                  f"run directory: {metrics['run_dir']}")
    for w in warnings:
        console.print(f"[bold yellow]warning:[/] {w}")
