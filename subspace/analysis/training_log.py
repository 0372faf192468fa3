"""Training curves: read from a Lightning CSVLogger file, or recorded live by a callback."""

from __future__ import annotations

import csv
from pathlib import Path

Curves = dict[str, tuple[list[int], list[float]]]  # metric → (steps, values)
TRAINING_PREFIXES = ("train/", "subspace/")  # the objective's terms and the SubspaceMonitor's overlap


def read_training_curves(path: str | Path, prefixes: tuple[str, ...] = TRAINING_PREFIXES) -> Curves:
    """The columns of a CSVLogger metrics.csv that start with one of `prefixes`, as (step, value) pairs.

    Blank cells are skipped: CSVLogger leaves them where a row holds other metrics (the final eval/* row).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training log {path} does not exist; pass a run's csv/metrics.csv "
                                "(written by logger=csv or the default loggers)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        columns = [c for c in fields if c.startswith(prefixes)]
        if "step" not in fields or not columns:
            raise ValueError(f"{path} has no 'step' column or no column starting with {prefixes} (columns: {fields}); "
                             "is it a Lightning CSVLogger metrics.csv?")
        curves: Curves = {c: ([], []) for c in columns}
        for row in reader:
            for column in columns:
                if row[column] not in (None, "") and row["step"] not in (None, ""):
                    curves[column][0].append(int(float(row["step"])))
                    curves[column][1].append(float(row[column]))
    return {name: points for name, points in curves.items() if points[0]}
