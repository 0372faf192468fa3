"""Run a pre-registered candidate list one after another, then pick one by the project's rule (selection split only).

    python scripts/candidates.py run PLAN_DIR OUT_DIR      # each line of PLAN_DIR/candidates.txt: ID OVERRIDE...;
                                                           # candidates already finished in OUT_DIR are skipped
    python scripts/candidates.py pick PLAN_DIR OUT_DIR     # writes PLAN_DIR/candidates.json

candidates.txt's first line holds the overrides every candidate shares. The pick is `subspace.benchmark.choice.pick_point`
on each run's `select_refusal_rate_after` and `select_kl` (`run` passes eval.on_select=true, which single runs leave
off) with the refusal budget the plan states (5% unless
PLAN_DIR/refusal_budget.txt holds another); val numbers are never read.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # the repository root replaces this script's folder on the path
from subspace.benchmark.choice import REFUSAL_BUDGET, pick_point  # noqa: E402


def read_plan(plan: Path) -> tuple[list[str], dict[str, list[str]]]:
    lines = [shlex.split(line) for line in (plan / "candidates.txt").read_text().splitlines() if line.strip()]
    return lines[0], {line[0]: line[1:] for line in lines[1:]}


def refusal_budget(plan: Path) -> float:
    path = plan / "refusal_budget.txt"
    return float(path.read_text()) if path.exists() else REFUSAL_BUDGET


def run(plan: Path, out: Path) -> None:
    common, candidates = read_plan(plan)
    for cid, overrides in candidates.items():  # one at a time: the 2-core machines cannot train two at once
        if (out / cid / "metrics.json").exists():  # finished by an earlier, interrupted `run`
            print(f"{cid}: already finished in {out / cid}, skipped")
            continue
        subprocess.run([sys.executable, str(ROOT / "train.py"), *common, *overrides, "eval.on_select=true",
                        f"hydra.run.dir={out / cid}"], check=True, cwd=ROOT)


def pick(plan: Path, out: Path) -> str:
    _, candidates = read_plan(plan)
    rows = []
    for cid, overrides in candidates.items():
        m = json.loads((out / cid / "metrics.json").read_text())
        rows.append({"candidate": cid, "overrides": overrides, "select_refusal_rate_after": m["select_refusal_rate_after"],
                     "select_kl": m["select_kl"], "n_select": m["config"]["data"]["n_select"],
                     "wall_time_s": m["wall_time_s"], "git_commit": m["git_commit"]})
    budget = refusal_budget(plan)
    chosen = pick_point(rows, [r["select_refusal_rate_after"] for r in rows], [r["select_kl"] for r in rows], budget)
    (plan / "candidates.json").write_text(json.dumps(
        {"refusal_budget": budget, "candidates": rows, "pick": chosen["candidate"]}, indent=1) + "\n")
    for r in rows:
        print(f"{r['candidate']:>4}  refusal {100 * r['select_refusal_rate_after']:5.1f}%  KL {r['select_kl']:.4f}  "
              f"{' '.join(r['overrides']) or '(none)'}")
    print("pick:", chosen["candidate"])
    return chosen["candidate"]


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("run", "pick"):
        sys.exit(f"usage: python scripts/candidates.py run|pick PLAN_DIR OUT_DIR (got {sys.argv[1:]})")
    {"run": run, "pick": pick}[sys.argv[1]](Path(sys.argv[2]).resolve(), Path(sys.argv[3]).resolve())
