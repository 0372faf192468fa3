"""Write a geometry measurement to a folder: the table (CSV + JSON) and its figures (PNG).

The script and the end-of-training callback both call `write_report`, so a run directory holds the
same files whichever made them.
"""

from __future__ import annotations

from pathlib import Path

from subspace.analysis.geometry import Geometry
from subspace.analysis.plots import plot_pca_grid, plot_separation, plot_training_curves
from subspace.analysis.training_log import Curves
from subspace.utils.io import write_csv, write_json

TABLE_CSV, TABLE_JSON = "geometry.csv", "geometry.json"


def write_table(geometry: Geometry, out_dir: Path) -> dict[str, Path]:
    """geometry.csv (one row per layer; empty cells where undefined) and geometry.json (columns + meta)."""
    table = geometry.table
    rows = [dict(zip(table, values)) for values in zip(*table.values())]
    write_csv(out_dir / TABLE_CSV, rows)
    write_json(out_dir / TABLE_JSON, {"meta": geometry.meta, "layers": rows})
    return {"table_csv": out_dir / TABLE_CSV, "table_json": out_dir / TABLE_JSON}


def write_report(geometry: Geometry, out_dir: str | Path, curves: Curves | None = None, title: str = "",
                 pca_layers: list[int] | None = None) -> dict[str, Path]:
    """Table, separation curves, PCA grids (before, and after when measured) and training curves (when given)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"{title}: " if title else ""
    paths = write_table(geometry, out_dir)
    paths["separation"] = plot_separation(geometry.table, out_dir / "separation.png", f"{prefix}separation per layer",
                                          geometry.edited_layers, geometry.meta.get("reference_layer"))
    paths["pca_before"] = plot_pca_grid(geometry.before, out_dir / "pca_before.png", f"{prefix}PCA per layer, before",
                                        pca_layers)
    if geometry.after is not None:
        paths["pca_after"] = plot_pca_grid(geometry.after, out_dir / "pca_after.png",
                                           f"{prefix}PCA per layer, after the edit", pca_layers)
    if curves:
        paths["training_curves"] = plot_training_curves(curves, out_dir / "training_curves.png", f"{prefix}training")
    return paths
