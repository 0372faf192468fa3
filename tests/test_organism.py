"""Organism caching: keyed by what the weights depend on, built once, answers reused, failures leave nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from subspace.organisms import answers as answers_module
from subspace.organisms import shipped
from subspace.organisms.answers import own_answers
from subspace.organisms.cache import build_once, organism_key
from subspace.organisms.causal import RECIPE_VERSION, OrganismRecipe, load_causal_organism
from subspace.organisms.recipe import as_recipe
from tests.conftest import TINY_ORGANISM, VAL_SETS, run_evaluate_organism


def test_a_cached_organism_is_loaded_not_rebuilt(cache_dir, tiny_organism):
    folder = tiny_organism.source["organism"]
    info = json.loads((cache_dir / "organisms" / folder.rsplit("/", 1)[1] / "organism.json").read_text())
    again = load_causal_organism(cache_dir=str(cache_dir), **TINY_ORGANISM)
    assert again.source["organism"] == folder
    assert json.loads((cache_dir / "organisms" / folder.rsplit("/", 1)[1] / "organism.json").read_text()) == info


def test_the_key_covers_recipe_prompts_and_base():
    prompts = {"harmful": ["a"], "harmless": ["b"], "lookalike": ["c"]}
    key = organism_key({"base": 1}, OrganismRecipe(), prompts, 3)
    assert key == organism_key({"base": 1}, OrganismRecipe(), prompts, 3)
    assert key != organism_key({"base": 1}, OrganismRecipe(max_steps=151), prompts, 3)
    assert key != organism_key({"base": 1}, OrganismRecipe(), prompts | {"harmless": ["b", "d"]}, 3)
    assert key != organism_key({"base": 2}, OrganismRecipe(), prompts, 3)
    assert key != organism_key({"base": 1}, OrganismRecipe(), prompts, 4)
    assert key != organism_key({"base": 1}, OrganismRecipe(), prompts, 3, accelerator="gpu")
    assert key == organism_key({"base": 1}, OrganismRecipe(), prompts, 3, accelerator="cpu")


def test_a_recipe_field_added_with_a_none_default_keeps_earlier_keys():
    """The LLaDA recipe gained `precision` (None: float32) after organisms were built and keyed without it."""
    from dataclasses import dataclass

    from subspace.organisms.llada import DiffusionRecipe

    @dataclass
    class Later(OrganismRecipe):
        added: str | None = None

    prompts = {"harmful": ["a"], "harmless": ["b"], "lookalike": []}
    assert organism_key({"base": 1}, Later(), prompts, 3) == organism_key({"base": 1}, OrganismRecipe(), prompts, 3)
    assert organism_key({"base": 1}, Later(added="x"), prompts, 3) != organism_key({"base": 1}, OrganismRecipe(), prompts, 3)
    assert (organism_key({}, DiffusionRecipe(precision="bf16-mixed"), prompts, 1)
            != organism_key({}, DiffusionRecipe(), prompts, 1))


def ship_tiny(tiny_organism, root: Path) -> tuple[OrganismRecipe, dict]:
    """Ship the session's tiny organism into `root`, as scripts/ship_organism.py does; (recipe, its record)."""
    recipe = as_recipe(TINY_ORGANISM["recipe"], OrganismRecipe)
    shipped.ship(Path(tiny_organism.source["organism"]), "tiny_organism", tiny_organism.source["organism_key"],
                 tiny_organism.source["base"], recipe, recipe.prompts(), RECIPE_VERSION, root)
    return recipe, shipped.shipped_record("tiny_organism", root)


def test_a_shipped_adapter_gives_the_built_organism_bit_for_bit_without_a_fine_tune(tiny_organism, tmp_path,
                                                                                     monkeypatch):
    ship_tiny(tiny_organism, tmp_path / "shipped")
    monkeypatch.setattr(shipped, "SHIPPED", tmp_path / "shipped")
    fresh = tmp_path / "cache"  # nothing built here
    loaded = load_causal_organism(cache_dir=str(fresh), **TINY_ORGANISM)
    assert [p.name for p in (fresh / "organisms").iterdir() if p.is_dir()] == [
        f"tiny_organism_shipped-{tiny_organism.source['organism_key']}"]
    assert not (fresh / "answers").exists()  # no fine-tune ran: its first step generates the base's answers
    built, merged = tiny_organism.model.state_dict(), loaded.model.state_dict()
    assert built.keys() == merged.keys() and all(torch.equal(built[k], merged[k]) for k in built)

    rebuilt = load_causal_organism(cache_dir=str(fresh), **TINY_ORGANISM | {"rebuild": True})
    assert rebuilt.source["organism"] == str(fresh / "organisms" / f"tiny_organism-{tiny_organism.source['organism_key']}")


def test_a_damaged_shipped_adapter_is_refused_not_merged(tiny_organism, tmp_path):
    _, record = ship_tiny(tiny_organism, tmp_path / "shipped")
    (tmp_path / "shipped" / "tiny_organism" / "adapter_model.safetensors").write_text("version https://git-lfs")
    with pytest.raises(RuntimeError, match="does not match the sha256"):
        shipped.save_shipped("tiny_organism", record, lambda: pytest.fail("loaded the base"), tmp_path / "out",
                             tmp_path / "shipped")


def test_a_shipped_adapter_stands_in_only_for_its_own_base_recipe_and_prompts(tiny_organism, tmp_path, monkeypatch):
    recipe, record = ship_tiny(tiny_organism, tmp_path / "shipped")
    base, prompts = tiny_organism.source["base"], recipe.prompts()
    assert shipped.usable(record, base, recipe, prompts, RECIPE_VERSION) == (True, "same base, recipe and prompts")
    assert not shipped.usable(record, {"other": 1}, recipe, prompts, RECIPE_VERSION)[0]
    assert not shipped.usable(record, base, recipe, prompts, RECIPE_VERSION + 1)[0]
    changed = as_recipe(TINY_ORGANISM["recipe"] | {"max_steps": 7}, OrganismRecipe)
    assert shipped.usable(record, base, changed, prompts, RECIPE_VERSION) == (
        False, "its recipe differs in ['max_steps']")
    fewer = prompts | {"harmful": prompts["harmful"][:-1]}
    monkeypatch.setattr(shipped, "shared_data_dir", lambda: tmp_path)  # the public splits exist: prompts changed
    assert shipped.usable(record, base, recipe, fewer, RECIPE_VERSION) == (
        False, "its training prompts differ from this recipe's")
    monkeypatch.setattr(shipped, "shared_data_dir", lambda: tmp_path / "absent")  # they are missing here
    use, why = shipped.usable(record, base, recipe, fewer, RECIPE_VERSION)
    assert use and "public splits this machine lacks" in why


def test_answers_are_generated_once_and_reused(cache_dir, tiny_organism, monkeypatch):
    prompts = ["Name a red fruit.", "How do I boil an egg?"]
    first = own_answers(tiny_organism, {"test": 1}, prompts, 4, 2, str(cache_dir))
    monkeypatch.setattr(answers_module, "generate_responses", lambda *a, **k: pytest.fail("regenerated"))
    assert own_answers(tiny_organism, {"test": 1}, prompts, 4, 2, str(cache_dir)) == first


def test_a_failed_build_leaves_nothing_that_looks_finished(tmp_path):
    def broken(folder):
        (folder / "half-written").write_text("x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        build_once(str(tmp_path), "org", "k", broken)
    assert not (tmp_path / "organisms" / "org-k").exists()
    assert build_once(str(tmp_path), "org", "k", lambda folder: {"ok": True}).joinpath("organism.json").exists()


SELECT_SETS = ("harmful_select", "harmless_select", "lookalike_select")


@pytest.mark.parametrize("split, sets", [("val", VAL_SETS), ("select", SELECT_SETS)])
def test_evaluate_organism_script_reports_every_set(tmp_path, cache_dir, tiny_organism, split, sets):
    """scripts/evaluate_organism.py as a user runs it, on the report sets or the selection sets."""
    run_evaluate_organism(tmp_path, cache_dir, "tiny_organism", sets, f"organism_sets={split}")
    report = json.loads((tmp_path / "organism_quality.json").read_text())
    assert {k for k in report if k not in ("model", "model_source")} == set(sets)
    for name in sets:
        assert report[name]["n"] == 3 and 0 <= report[name]["refusal_rate"] <= 1
