"""Organism caching: keyed by what the weights depend on, built once, answers reused, failures leave nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from subspace.models import organism as organism_module
from subspace.models.organism import OrganismRecipe, build_once, load_causal_organism, organism_key, own_answers
from tests.conftest import ROOT, TINY_ORGANISM


def test_a_cached_organism_is_loaded_not_rebuilt(cache_dir, tiny_organism):
    folder = tiny_organism.source["organism"]
    info = json.loads((cache_dir / "organisms" / folder.rsplit("/", 1)[1] / "organism.json").read_text())
    again = load_causal_organism(cache_dir=str(cache_dir), **TINY_ORGANISM)
    assert again.source["organism"] == folder
    assert json.loads((cache_dir / "organisms" / folder.rsplit("/", 1)[1] / "organism.json").read_text()) == info


def test_the_key_covers_recipe_prompts_and_base():
    prompts = {"harmful": ["a"], "harmless": ["b"], "lookalike": ["c"]}
    key = organism_key({"base": 1}, OrganismRecipe(), prompts)
    assert key == organism_key({"base": 1}, OrganismRecipe(), prompts)
    assert key != organism_key({"base": 1}, OrganismRecipe(max_steps=151), prompts)
    assert key != organism_key({"base": 1}, OrganismRecipe(), prompts | {"harmless": ["b", "d"]})
    assert key != organism_key({"base": 2}, OrganismRecipe(), prompts)


def test_answers_are_generated_once_and_reused(cache_dir, tiny_organism, monkeypatch):
    prompts = ["Name a red fruit.", "How do I boil an egg?"]
    first = own_answers(tiny_organism, {"test": 1}, prompts, 4, 2, str(cache_dir))
    monkeypatch.setattr(organism_module, "generate_responses", lambda *a, **k: pytest.fail("regenerated"))
    assert own_answers(tiny_organism, {"test": 1}, prompts, 4, 2, str(cache_dir)) == first


def test_a_failed_build_leaves_nothing_that_looks_finished(tmp_path):
    def broken(folder):
        (folder / "half-written").write_text("x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        build_once(str(tmp_path), "org", "k", broken)
    assert not (tmp_path / "organisms" / "org-k").exists()
    assert build_once(str(tmp_path), "org", "k", lambda folder: {"ok": True}).joinpath("organism.json").exists()


VAL_SETS = ("harmful_val", "harmless_val", "lookalike_heldout")
SELECT_SETS = ("harmful_select", "harmless_select", "lookalike_select")


def run_evaluate_organism(tmp_path, cache_dir, model: str, sets: tuple[str, ...] = VAL_SETS,
                          *overrides: str) -> None:
    """scripts/evaluate_organism.py on 3 prompts of each set, as a user runs it, writing into tmp_path."""
    limits = [f"sets.{name}.limit=3" for name in sets]
    cmd = [sys.executable, str(ROOT / "scripts" / "evaluate_organism.py"), f"model={model}",
           f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path}", "eval.max_new_tokens=4", "eval/judge=three_way_text",
           *limits, *overrides]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("split, sets", [("val", VAL_SETS), ("select", SELECT_SETS)])
def test_evaluate_organism_script_reports_every_set(tmp_path, cache_dir, tiny_organism, split, sets):
    """scripts/evaluate_organism.py as a user runs it, on the report sets or the selection sets."""
    run_evaluate_organism(tmp_path, cache_dir, "tiny_organism", sets, f"organism_sets={split}")
    report = json.loads((tmp_path / "organism_quality.json").read_text())
    assert {k for k in report if k not in ("model", "model_source")} == set(sets)
    for name in sets:
        assert report[name]["n"] == 3 and 0 <= report[name]["refusal_rate"] <= 1
