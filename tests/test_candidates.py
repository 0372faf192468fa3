"""scripts/candidates.py: the pick reads only the selection numbers and follows the project's rule."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_run(out: Path, cid: str, refusal: float, kl: float, val_refusal: float) -> None:
    (out / cid).mkdir(parents=True)
    metrics = {"select_refusal_rate_after": refusal, "select_kl": kl, "refusal_rate_after": val_refusal,
               "config": {"data": {"n_select": 64}}, "wall_time_s": 1.0, "git_commit": "x"}
    (out / cid / "metrics.json").write_text(json.dumps(metrics))


def test_pick_takes_the_lowest_kl_within_the_budget_and_ignores_val(tmp_path):
    plan, out = tmp_path / "plan", tmp_path / "runs"
    plan.mkdir()
    (plan / "candidates.txt").write_text("model=x method=subspace\nA\nB method.rank=8\nC objective.kl_weight=1\n")
    write_run(out, "A", 0.10, 0.01, 0.0)    # lowest KL and best val, but over the 5% budget
    write_run(out, "B", 0.04, 0.05, 0.5)
    write_run(out, "C", 0.02, 0.03, 0.5)    # within the budget, lower KL than B: the pick
    done = subprocess.run([sys.executable, str(ROOT / "scripts/candidates.py"), "pick", str(plan), str(out)],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip().endswith("pick: C")
    result = json.loads((plan / "candidates.json").read_text())
    assert result["pick"] == "C" and [r["overrides"] for r in result["candidates"]] == [[], ["method.rank=8"],
                                                                                       ["objective.kl_weight=1"]]


def test_run_skips_candidates_an_earlier_run_finished(tmp_path):
    plan, out = tmp_path / "plan", tmp_path / "runs"
    plan.mkdir()
    (plan / "candidates.txt").write_text("model=no_such_model\nA\nB method.rank=8\n")  # would fail if trained
    write_run(out, "A", 0.10, 0.01, 0.0)
    write_run(out, "B", 0.04, 0.05, 0.5)
    done = subprocess.run([sys.executable, str(ROOT / "scripts/candidates.py"), "run", str(plan), str(out)],
                          capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == [f"A: already finished in {out / 'A'}, skipped",
                                        f"B: already finished in {out / 'B'}, skipped"]


def test_a_plan_can_state_a_tighter_refusal_budget(tmp_path):
    plan, out = tmp_path / "plan", tmp_path / "runs"
    plan.mkdir()
    (plan / "candidates.txt").write_text("model=x\nA\nB method.rank=8\n")
    (plan / "refusal_budget.txt").write_text("0.016\n")
    write_run(out, "A", 0.047, 0.03, 0.0)   # the pick under the default 5% budget
    write_run(out, "B", 0.015, 0.09, 0.5)   # the only one within 1.6%
    subprocess.run([sys.executable, str(ROOT / "scripts/candidates.py"), "pick", str(plan), str(out)], check=True,
                   capture_output=True)
    result = json.loads((plan / "candidates.json").read_text())
    assert result["pick"] == "B" and result["refusal_budget"] == 0.016
