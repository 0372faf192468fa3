"""`python -m subspace.sweeps SWEEP_DIR`: the Pareto table again, e.g. for a sweep that stopped before its end."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from subspace.sweeps.table import report_sweep


def recorded_objectives(sweep_dir: Path) -> list[str]:
    """`optimized_metrics` as the sweep's first finished trial recorded it in metrics.json."""
    for path in sorted(sweep_dir.glob("**/metrics.json")):
        return list(json.loads(path.read_text())["config"]["optimized_metrics"])
    raise FileNotFoundError(f"no finished trial (metrics.json) under {sweep_dir}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--objectives", nargs="+", help="metrics.json keys, all minimised (default: the sweep's "
                                                         "optimized_metrics)")
    args = parser.parse_args(argv)
    report_sweep(args.sweep_dir, args.objectives or recorded_objectives(args.sweep_dir))


if __name__ == "__main__":
    main()
