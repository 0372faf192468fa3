"""The benchmark harness: the rule that picks a point, the table, and `scripts/benchmark.py` end to end on the
tiny organism (heretic pointed at a venv that does not exist, so its row must say why instead of a number)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from subspace.benchmark.choice import pick_point
from subspace.benchmark.rows import Row, markdown_table, train_row
from tests.conftest import ROOT


def test_pick_point_takes_the_lowest_kl_within_the_refusal_budget():
    points = ["a", "b", "c", "d"]
    assert pick_point(points, [0.0, 0.03, 0.1, 0.5], [0.30, 0.05, 0.02, 0.01], refusal_budget=0.05) == "b"
    assert pick_point(points, [0.2, 0.1, 0.1, 0.5], [0.30, 0.25, 0.20, 0.15], refusal_budget=0.05) == "c"  # none within
    with pytest.raises(ValueError, match="4 points but 3 refusal rates"):
        pick_point(points, [0.0, 0.1, 0.1], [0.3, 0.2, 0.1, 0.0], 0.05)


def test_table_shows_numbers_and_says_why_a_row_has_none():
    rows = [Row("org", "subspace", "python train.py model=org", 0.9, 0.05, 0.02, 0.1234, 90.0, "90 steps"),
            Row("org", "heretic", "heretic", 0.9, note="heretic venv missing: /x/bin/python\nmore detail")]
    table = markdown_table(rows, "first response token")
    assert "| org | subspace | 90.0% → 5.0% | 2.0% | 0.123 | 1.5 min | 90 steps | `python train.py model=org` |" in table
    assert "| org | heretic | not measured: heretic venv missing: /x/bin/python |" in table
    assert "more detail" not in table


def test_a_failing_train_row_keeps_the_log_tail(tmp_path):
    row = train_row("tiny_organism", "no_such_method", [], tmp_path / "bad", ROOT)
    assert row.refusal_after is None and "train.py exited with 1" in row.note and "no_such_method" in row.note


def test_benchmark_script_end_to_end(tmp_path, cache_dir, tiny_organism):
    out = tmp_path / "bench"
    common = f"paths.cache_dir={cache_dir}"
    cmd = [sys.executable, str(ROOT / "scripts/benchmark.py"), "model=tiny_organism", common, f"hydra.run.dir={out}",
           "eval/judge=three_way_text",
           f"train_overrides=['debug=fast','logger=csv','{common}']", "heretic.python=/nonexistent/bin/python",
           "row_overrides.diff_means=['method.scan_layers=[1,2]']",
           "overhead.steps=2", "overhead.warmup=1"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "benchmark.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["diff_means", "subspace", "heretic"]
    for method in ("diff_means", "subspace"):
        metrics = json.loads((out / method / "metrics.json").read_text())
        assert rows[method]["refusal_after"] == metrics["refusal_rate_after"] and rows[method]["kl"] == metrics["kl"]
    assert rows["subspace"]["trials_or_steps"] == "3 steps" and rows["diff_means"]["trials_or_steps"] == "2 layers scanned"
    assert rows["heretic"]["refusal_after"] is None and "/nonexistent/bin/python" in rows["heretic"]["note"]
    assert report["overhead"]["step_overhead_ratio"] > 0
    assert "costs" in (out / "benchmark.md").read_text()


def test_heretic_row_says_why_for_a_model_it_cannot_load():
    from subspace.benchmark.heretic_row import unsupported
    assert unsupported("smollm2_organism", "causal") is None
    row = unsupported("llada_organism", "llada")
    assert row.refusal_after is None and "causal language models only" in row.note and "llada model" in row.note


def test_template_system_prompt_finds_the_default_a_template_inserts():
    from subspace.benchmark.heretic_row import template_system_prompt
    from subspace.models.tiny import tiny_random_causal

    tok = tiny_random_causal(hidden_size=32, num_layers=1).tokenizer
    assert template_system_prompt(tok) is None  # the tiny template adds no system turn
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n{% endif %}"
                         "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert template_system_prompt(tok) == "Be brief."


def test_holdout_split_points_at_existing_files_or_says_which_are_missing(tmp_path, monkeypatch):
    from subspace.benchmark.splits import split_overrides

    assert split_overrides("val") == []
    monkeypatch.setenv("SUBSPACE_SHARED_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"split=holdout needs .*holdout/harmful_test.json"):
        split_overrides("holdout")
    (tmp_path / "holdout").mkdir()
    for name in ("harmful_test.json", "harmless_test.json"):
        (tmp_path / "holdout" / name).write_text('["x"]')
    assert split_overrides("holdout") == [f"data.eval_harmful={tmp_path}/holdout/harmful_test.json",
                                          f"data.eval_harmless={tmp_path}/holdout/harmless_test.json"]
    with pytest.raises(ValueError, match=r"split='test' must be one of \('val', 'holdout'\)"):
        split_overrides("test")
