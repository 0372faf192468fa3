"""PNG figures of the geometry and of training, drawn off-screen.

Figures are built as `matplotlib.figure.Figure` objects and saved through the Agg canvas, never through
pyplot: no global backend switch, no open-figure registry, safe in a training process or a notebook.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from subspace.analysis.collect import ClassResiduals
from subspace.analysis.geometry import Table
from subspace.analysis.statistics import principal_components
from subspace.analysis.training_log import Curves

COLOURS = {"harmful": "tab:red", "harmless": "tab:blue", "before": "tab:gray", "after": "tab:green",
           "direction": "tab:purple", "subspace": "tab:orange"}


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def _nan(values: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None else v for v in values]


def _shade(ax, layers: Sequence[int]) -> None:
    for layer in layers:
        ax.axvspan(layer - 0.5, layer + 0.5, color="tab:orange", alpha=0.07, lw=0)


def plot_separation(table: Table, path: str | Path, title: str = "", edited_layers: Sequence[int] = (),
                    reference_layer: int | None = None) -> Path:
    """Four per-layer panels sharing the layer axis: class-mean cosine, ‖r_l‖ and probe accuracy before/after,
    and the share of r_l held by the difference-of-means direction vs by the edit's subspace."""
    layers = table["layer"]
    fig = Figure(figsize=(8, 10), layout="constrained")
    axes = fig.subplots(4, 1, sharex=True)
    panels = (("cosine", "cosine of class means"), ("diff_norm", "‖mean harmful − mean harmless‖"),
              ("probe_accuracy", "held-out probe accuracy"))
    for ax, (key, label) in zip(axes, panels):
        for when in ("before", "after"):
            if f"{key}_{when}" in table:
                ax.plot(layers, _nan(table[f"{key}_{when}"]), marker="o", ms=3, color=COLOURS[when], label=when)
        ax.set_ylabel(label)
    axes[2].axhline(0.5, color="black", lw=0.6, ls=":")
    axes[2].set_ylim(0.4, 1.02)
    share = axes[3]
    ref = f" (r̂ of layer {reference_layer})" if reference_layer is not None else ""
    share.plot(layers, _nan(table["direction_share"]), marker="o", ms=3, color=COLOURS["direction"],
               label=f"difference-of-means direction{ref}")
    if "subspace_share_before" in table:
        share.plot(layers, _nan(table["subspace_share_before"]), marker="o", ms=3, color=COLOURS["subspace"],
                   label="edit subspace, r_l before")
    if "subspace_share_after" in table:
        share.plot(layers, _nan(table["subspace_share_after"]), marker="o", ms=3, ls="--", color=COLOURS["subspace"],
                   label="edit subspace, r_l after")
    share.set_ylim(-0.02, 1.02)
    share.set_ylabel("share of r_l captured")
    share.set_xlabel("layer (residual entering it)" + ("; shaded: layers the edit writes in" if edited_layers else ""))
    share.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        _shade(ax, edited_layers)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title or "separation of harmful and harmless residuals per layer")
    return _save(fig, path)


def plot_pca_grid(residuals: ClassResiduals, path: str | Path, title: str = "",
                  layers: Sequence[int] | None = None) -> Path:
    """One scatter per layer of both classes on that layer's top two principal axes (pooled, centred)."""
    layers = list(range(residuals.num_layers)) if layers is None else list(layers)
    cols = math.ceil(math.sqrt(len(layers)))
    rows = math.ceil(len(layers) / cols)
    fig = Figure(figsize=(2.3 * cols, 2.3 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    n = residuals.harmful.shape[1]
    for ax, layer in zip(axes, layers):
        coords = principal_components(residuals.pooled(layer)).numpy()
        ax.scatter(coords[n:, 0], coords[n:, 1], s=5, alpha=0.6, color=COLOURS["harmless"], label="harmless")
        ax.scatter(coords[:n, 0], coords[:n, 1], s=5, alpha=0.6, color=COLOURS["harmful"], label="harmful")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(layers):]:
        ax.set_axis_off()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=9)
    fig.suptitle(title or "PCA of residuals per layer")
    return _save(fig, path)


def plot_training_curves(curves: Curves, path: str | Path, title: str = "") -> Path:
    """One panel per logged metric against the optimiser step."""
    if not curves:
        raise ValueError("no training curves to plot (no train/* metrics were logged)")
    cols = min(3, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig = Figure(figsize=(4 * cols, 3 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, (steps, values)) in zip(axes, sorted(curves.items())):
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(curves):]:
        ax.set_axis_off()
    fig.suptitle(title or "training")
    return _save(fig, path)


def plot_comparison(tables: Mapping[str, Table], path: str | Path, title: str = "") -> Path:
    """Models side by side on one axis per statistic (cosine of class means, probe accuracy, share of r_l held by
    the edit's subspace), before solid and after dashed, against relative depth so that depths compare."""
    panels = (("cosine", "cosine of class means"), ("probe_accuracy", "held-out probe accuracy"),
              ("subspace_share", "share of r_l in the edit subspace"))
    fig = Figure(figsize=(8, 9), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True)
    colours = iter(("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:brown"))
    for name, table in tables.items():
        colour = next(colours)
        depth = [layer / max(1, len(table["layer"]) - 1) for layer in table["layer"]]
        for ax, (key, label) in zip(axes, panels):
            for when, style in (("before", "-"), ("after", "--")):
                if f"{key}_{when}" in table:
                    ax.plot(depth, _nan(table[f"{key}_{when}"]), ls=style, marker="o", ms=2, color=colour,
                            label=f"{name}, {when}")
            ax.set_ylabel(label)
    axes[-1].set_xlabel("relative depth (layer / last layer)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title or "separation per layer, side by side")
    return _save(fig, path)


def plot_organism_curve(table: Sequence[Mapping[str, float]], sets: Sequence[str], path: str | Path,
                        title: str = "") -> Path:
    """One panel per set: the rates of `answer`, `refusal` and `broken` against the fine-tune's step."""
    fig = Figure(figsize=(4.2 * len(sets), 3.4))
    steps = [row["step"] for row in table]
    for i, name in enumerate(sets):
        ax = fig.add_subplot(1, len(sets), i + 1)
        for verdict, colour in (("answer", "tab:green"), ("refusal", "tab:red"), ("broken", "tab:gray")):
            ax.plot(steps, [row[f"{name}_{verdict}"] for row in table], marker="o", color=colour, label=verdict)
        ax.set(title=name, xlabel="fine-tune step", ylim=(-0.03, 1.03))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.axes[0].set_ylabel("share of responses")
    fig.axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
