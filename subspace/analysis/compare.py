"""`python -m subspace.analysis.compare NAME=RUN_DIR NAME=RUN_DIR --out FILE.png`: the separation curves of several
`scripts/analyze.py` runs (e.g. the causal and the LLaDA organism) on one set of axes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from subspace.analysis.geometry import Table
from subspace.analysis.report import TABLE_JSON


def read_table(run_dir: str | Path) -> Table:
    """The per-layer columns of an analyze run, from its geometry.json (None where a cell is undefined)."""
    path = Path(run_dir) / TABLE_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass the run directory of `python scripts/analyze.py`")
    rows = json.loads(path.read_text())["layers"]
    return {key: [row.get(key) for row in rows] for key in rows[0]}


def main(argv: list[str] | None = None) -> None:
    from subspace.analysis.plots import plot_comparison  # matplotlib only when drawing

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR, one per model")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if bad := [r for r in args.runs if "=" not in r]:
        parser.error(f"{bad}: each run is NAME=RUN_DIR")
    tables = {name: read_table(run_dir) for name, run_dir in (r.split("=", 1) for r in args.runs)}
    print(plot_comparison(tables, args.out))


if __name__ == "__main__":
    main()
