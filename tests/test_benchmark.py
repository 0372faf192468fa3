"""The benchmark harness: the rule that picks a point, the table, and `scripts/benchmark.py` end to end on the
tiny organism (heretic pointed at a venv that does not exist, so its row must say why instead of a number; abliterix
played by a stand-in that exports the organism unchanged, so its row is measured by this project's evaluator)."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from subspace.benchmark.choice import pick_point
from subspace.benchmark.rows import Row, markdown_table, train_row
from tests.conftest import ROOT

# Plays abliterix 1.12.2 run headless by subspace.baselines.abliterix: it reads its TOML, prints its banner, baseline
# and one trial, and exports the model it was given, unchanged, with reproduce/reproduce.json.
FAKE_ABLITERIX = r'''
import json, pathlib, shutil, sys, tomllib
args = sys.argv[3:]
config = tomllib.loads(pathlib.Path(args[args.index("--config") + 1]).read_text())
out = pathlib.Path(args[args.index("--non-interactive-output-dir") + 1])
print("█▀▀█░█▀▀▄░█░░░▀█▀░▀█▀░█▀▀░█▀▀▄░▀█▀░█░█  v1.12.2")
print("* Initial refusals: 3/4 known (0 unknown)")
print("Running trial 1 of 1...")
print("  * full_distribution_kl (mean_per_token_kl): 0.0100 nats/token")
print("  * Refusals: 1/4 known (0 unknown)")
shutil.copytree(config["model"]["model_id"], out)
(out / "reproduce").mkdir()
(out / "reproduce" / "reproduce.json").write_text(json.dumps({"trial": {"index": 1}, "metrics": {
    "kl_divergence": 0.01, "refusals": 1, "baseline_refusals": 3, "n_target_prompts": 4}}))
print("Export verified: 1 weight file(s) hashed with SHA256.")
'''


def fake_abliterix(tmp_path: Path) -> Path:
    script = tmp_path / "fake-abliterix-python"
    script.write_text(f"#!{sys.executable}\n{FAKE_ABLITERIX}")
    script.chmod(0o755)
    return script


def run_benchmark(tmp_path: Path, cache_dir: Path, *overrides: str) -> tuple[Path, dict]:
    out = tmp_path / "bench"
    common = f"paths.cache_dir={cache_dir}"
    cmd = [sys.executable, str(ROOT / "scripts/benchmark.py"), "model=tiny_organism", common, f"hydra.run.dir={out}",
           "eval/judge=three_way_text", f"train_overrides=['debug=fast','logger=csv','{common}']",
           "overhead.steps=2", "overhead.warmup=1", *overrides]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "benchmark.json").read_text())


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
    out, report = run_benchmark(tmp_path, cache_dir, "heretic.python=/nonexistent/bin/python",
                                "row_overrides.diff_means=['method.scan_layers=[1,2]']",
                                "rows=[diff_means,subspace,heretic,abliterix]",
                                f"abliterix.python={fake_abliterix(tmp_path)}", "abliterix.trials=3",
                                "eval.max_new_tokens=8", "data.eval_harmful_limit=6", "data.eval_harmless_limit=6")
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["diff_means", "subspace", "heretic", "abliterix"]
    for method in ("diff_means", "subspace"):
        metrics = json.loads((out / method / "metrics.json").read_text())
        assert rows[method]["refusal_after"] == metrics["refusal_rate_after"] and rows[method]["kl"] == metrics["kl"]
    assert rows["subspace"]["trials_or_steps"] == "3 steps" and rows["diff_means"]["trials_or_steps"] == "2 layers scanned"
    assert rows["heretic"]["refusal_after"] is None and "/nonexistent/bin/python" in rows["heretic"]["note"]
    assert report["overhead"]["step_overhead_ratio"] > 0
    assert "costs" in (out / "benchmark.md").read_text()

    # abliterix: run on the saved organism with the selection split as its evaluation prompts and this project's
    # response length, and its one exported model (here the organism itself) scored on the eval split
    abliterix = rows["abliterix"]
    assert abliterix["note"] == ("abliterix exported trial 1: 1/4 select refusals by its markers, "
                                 "KL 0.010 by its own measure"), abliterix["note"]
    assert abliterix["command"] == "abliterix 1.12.2 via subspace.baselines.abliterix, 3 trials"
    assert abliterix["refusal_before"] == rows["diff_means"]["refusal_before"]
    assert abliterix["kl"] == pytest.approx(0.0, abs=1e-5)  # the unchanged organism
    assert 0 <= abliterix["refusal_after"] <= 1 and abliterix["n_harmful"] == abliterix["n_harmless"] == 6
    config = tomllib.loads((out / "abliterix" / "abliterix.toml").read_text())
    assert config["model"]["model_id"] == str((out / "organism_hf").resolve())
    assert config["optimization"]["num_trials"] == 3
    assert config["inference"] == {"max_gen_tokens": 8}
    from datasets import load_from_disk
    select = load_from_disk(str(out / "abliterix" / "data" / "harmful_eval"))["text"]
    assert len(select) == report["settings"]["data"]["n_select"]
    assert "| tiny_organism | abliterix |" in (out / "benchmark.md").read_text()


def test_a_missing_abliterix_python_gives_a_row_that_says_why(tmp_path, cache_dir, tiny_organism):
    _, report = run_benchmark(tmp_path, cache_dir, "rows=[abliterix]", "abliterix.python=/nonexistent/bin/python",
                              "eval.max_new_tokens=8", "data.eval_harmful_limit=6")
    [row] = report["rows"]
    assert row["method"] == "abliterix" and row["refusal_after"] is None and row["refusal_before"] is not None
    assert "/nonexistent/bin/python does not exist" in row["note"]
    assert "scripts/install_peers.sh abliterix" in row["note"]


@pytest.mark.parametrize("method", ["heretic", "abliterix"])
def test_peer_rows_say_why_for_a_model_they_cannot_load(method):
    from subspace.benchmark import abliterix_row, heretic_row
    unsupported = {"heretic": heretic_row.unsupported, "abliterix": abliterix_row.unsupported}[method]
    assert unsupported("smollm2_organism", "causal") is None
    for organism, family in (("llada_organism", "llada"), ("diffusion_gemma_organism", "diffusion_gemma")):
        row = unsupported(organism, family)
        assert row.method == method and row.refusal_after is None and f"{family} model" in row.note
        assert f"{method} loads causal language models only" in row.note


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
