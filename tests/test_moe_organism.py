"""The MoE organism, on the tiny organism: exact upcycling, caching, experts that differ, the family, train.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralForCausalLM

import subspace.organisms.moe as moe_organism
from subspace.analysis.routing import format_routing_table, routing_stats
from subspace.config import register_resolvers
from subspace.data.loading import load_prompts
from subspace.families import CausalFamily, family_for
from subspace.interventions import ProjectionEdit
from subspace.organisms.moe import MoERecipe, load_moe_organism, upcycled_organism
from subspace.organisms.recipe import as_recipe
from subspace.organisms.upcycle import mixtral_config, upcycle_llama
from tests.conftest import ROOT

RECIPE = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny_moe_organism.yaml").recipe)  # as train.py's
EXPERTS = RECIPE["num_experts"]


@pytest.fixture(scope="module")
def tiny_moe_organism(cache_dir):
    """Built from `model=tiny_moe_organism` exactly as train.py instantiates it, so train.py finds it cached."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny_moe_organism", f"paths.cache_dir={cache_dir}"])
    return instantiate(cfg.model)


@pytest.fixture(scope="module")
def tiny_source(tiny_moe_organism, cache_dir):
    """The causal organism the MoE organism was built from (cached by then: `model=tiny_organism`)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny_organism", f"paths.cache_dir={cache_dir}"])
    source = instantiate(cfg.model)
    assert tiny_moe_organism.source["causal_organism"] == source.source["organism"]
    return source


def padded_ids(vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (3, 17), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # a left-padded row: routing sees the padding tokens too, the dense output must still match
    return {"input_ids": ids, "attention_mask": mask}


def held_out_prompts(n: int = 24) -> dict[str, list[str]]:
    return {name: load_prompts(f"builtin:{name}_heldout")[:n] for name in ("harmful", "harmless")}


def min_expert_share(rows: list[dict]) -> float:
    """The smallest share of the top-k assignments over all prompt tokens that any expert gets in any layer."""
    return min(min(r["share"]) for r in rows if r["positions"] == "all")


# --- (a) conversion ------------------------------------------------------------------------------------------


def test_upcycled_copies_reproduce_the_dense_logits_and_survive_a_round_trip(tiny_source, tmp_path):
    dense = tiny_source.model
    batch = padded_ids(dense.config.vocab_size)
    expected = dense(**batch).logits
    moe = upcycle_llama(dense, num_experts=4, top_k=2, noise=0.0, router_std=0.02, seed=3)
    assert isinstance(moe, MixtralForCausalLM) and moe.config.num_local_experts == 4
    assert moe.lm_head.weight is moe.model.embed_tokens.weight  # tied, as the dense model's
    real = batch["attention_mask"].bool()
    assert torch.allclose(moe(**batch).logits[real], expected[real], atol=1e-5)
    moe.save_pretrained(tmp_path / "moe")  # written in Mixtral's per-expert checkpoint layout, read back fused
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "moe")(**batch).logits, moe(**batch).logits)
    noisy = upcycle_llama(dense, num_experts=4, top_k=2, noise=0.01, seed=3)
    assert (noisy(**batch).logits - expected).abs().max() > 1e-4  # the check above would see a difference


def test_llama_variants_mixtral_cannot_hold_are_refused():
    with pytest.raises(ValueError, match="attention_bias=True"):
        mixtral_config(LlamaConfig(attention_bias=True), 4, 2)
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and num_experts=4"):
        mixtral_config(LlamaConfig(), 4, 5)


# --- (b) cache ---------------------------------------------------------------------------------------------


def test_second_load_hits_the_cache_and_the_key_follows_the_recipe(tiny_moe_organism, tiny_source, cache_dir,
                                                                    monkeypatch):
    class Rebuilt(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Rebuilt

    monkeypatch.setattr(moe_organism, "build_moe_organism", refuse)
    again = load_moe_organism(name="tiny_moe_organism", cache_dir=str(cache_dir), source=tiny_source, recipe=RECIPE)
    assert again.source == tiny_moe_organism.source  # no rebuild: the same folder and key
    with pytest.raises(Rebuilt):  # one changed setting: a different key, so a build is attempted
        load_moe_organism(name="tiny_moe_organism", cache_dir=str(cache_dir), source=tiny_source,
                          recipe={**RECIPE, "aux_loss_coef": 0.02})
    built = sorted(p.name for p in (cache_dir / "organisms").glob("tiny_moe_organism-*")
                   if (p / "organism.json").exists())
    assert built == [f"tiny_moe_organism-{tiny_moe_organism.source['organism_key']}"]  # the failed build left nothing


# --- (c) experts differ, router not collapsed ----------------------------------------------------------------


def test_experts_differ_from_each_other_and_from_their_initial_copies(tiny_moe_organism, tiny_source):
    model = tiny_moe_organism.model
    start = upcycled_organism(tiny_source, as_recipe(RECIPE, MoERecipe))
    for layer, initial in zip(model.model.layers, start.model.layers):
        experts = layer.mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            weights = getattr(experts, name)
            for a in range(EXPERTS):
                for b in range(a + 1, EXPERTS):
                    assert (weights[a] - weights[b]).norm() > 1e-3 * weights[a].norm(), (name, a, b)
            assert not torch.allclose(weights, getattr(initial.mlp.experts, name))  # training moved them
        assert not torch.allclose(layer.mlp.gate.weight, initial.mlp.gate.weight)  # the router was trained


def test_every_expert_gets_tokens_and_a_collapsed_router_is_caught(tiny_moe_organism):
    model, tokenizer = tiny_moe_organism.model, tiny_moe_organism.tokenizer
    prompts = held_out_prompts()
    rows = routing_stats(model, tokenizer, prompts, batch_size=8)
    layers = len(model.model.layers)
    assert len(rows) == 2 * 2 * layers  # sets x positions x layers
    for row in rows:
        assert math.isclose(sum(row["share"]), 1.0, abs_tol=1e-6) and 0 < row["entropy"] < math.log(EXPERTS)
    assert all(r["n_tokens"] == len(prompts[r["set"]]) for r in rows if r["positions"] == "last")
    assert min_expert_share(rows) > 0.05
    table = format_routing_table(rows)
    assert len(table.splitlines()) == len(rows) + 1 and "harmless" in table

    gates = [layer.mlp.gate.weight for layer in model.model.layers]
    saved = [g.clone() for g in gates]
    try:
        for g in gates:  # a collapsed router: all logits tie, so top-2 is always experts 0 and 1
            g.zero_()
        collapsed = routing_stats(model, tokenizer, prompts, batch_size=8)
    finally:
        for g, s in zip(gates, saved):
            g.copy_(s)
    assert min_expert_share(collapsed) == 0.0


# --- (d) family ----------------------------------------------------------------------------------------------


def test_the_moe_family_finds_one_fused_expert_writer_per_layer(tiny_moe_organism):
    model = tiny_moe_organism.model
    family = family_for(model)
    layers = range(len(model.model.layers))
    assert isinstance(family, CausalFamily) and sorted(family.moe_blocks) == list(layers)
    assert all(b.num_experts == EXPERTS and b.fused for b in family.moe_blocks.values())
    experts = [s.name for s in family.writer_sites() if s.kind == "expert_out"]
    assert experts == [f"model.layers.{i}.mlp.experts.down_proj" for i in layers]
    assert not [s for s in family.writer_sites() if s.kind == "mlp_out"]
    with family.recorded_routing() as fired:
        model(**family.chat_batch(tiny_moe_organism.tokenizer, held_out_prompts(4)["harmful"]))
    assert set(fired) == {f"model.layers.{i}.mlp.experts" for i in layers} and all(f.any() for f in fired.values())


# --- (e) train.py ---------------------------------------------------------------------------------------------


def test_train_py_on_the_tiny_moe_organism_reports_the_same_keys(tmp_path, cache_dir, tiny_moe_organism):
    from tests.conftest import REQUIRED, run_train

    metrics = run_train(tmp_path, cache_dir, "method=subspace", model="tiny_moe_organism")
    assert REQUIRED <= metrics.keys() and metrics["n_harmful"] == 6 and metrics["n_harmless"] == 6
    assert metrics["model_source"]["organism_key"] == tiny_moe_organism.source["organism_key"]  # the cached build
    sites = ProjectionEdit.load(tmp_path / "run" / "edit.safetensors").sites
    assert any(s.endswith("mlp.experts.down_proj") for s in sites)


def test_evaluate_organism_writes_the_routing_of_a_mixture_of_experts(tmp_path, cache_dir, tiny_moe_organism):
    from tests.conftest import run_evaluate_organism

    run_evaluate_organism(tmp_path, cache_dir, "tiny_moe_organism")
    rows = json.loads((tmp_path / "routing.json").read_text())
    layers = tiny_moe_organism.model.config.num_hidden_layers
    assert len(rows) == 3 * 2 * layers  # sets x positions x MoE layers
    assert all(abs(sum(r["share"]) - 1) < 1e-6 and r["n_tokens"] > 0 for r in rows)
    assert {r["set"] for r in rows} == {"harmful_val", "harmless_val", "lookalike_heldout"}
    assert "entropy" in (tmp_path / "routing.txt").read_text()


def test_the_full_size_config_composes_into_a_valid_recipe():
    """`model=moe_organism` (never built in tests): its recipe is a MoERecipe and its source the causal organism."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=moe_organism"])
    recipe = as_recipe(cfg.model.recipe, MoERecipe)
    assert (recipe.num_experts, recipe.top_k, recipe.answer_max_new_tokens) == (4, 2, 32)
    assert cfg.model._target_ == "subspace.organisms.moe.load_moe_organism"
    assert cfg.model.source._target_ == "subspace.organisms.causal.load_causal_organism"
