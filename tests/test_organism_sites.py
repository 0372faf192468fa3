"""The organisms' writer sites, pinned as they were before writers were found by structure (same names, same order,
same kinds): the organisms' numbers must not move when the way writers are found changes.

The sites depend on the architecture only, so the organisms' architectures are built untrained here: the tiny
organism is `tiny_llama` with `conf/model/tiny_organism.yaml`'s base settings (its LoRA fine-tune is merged back, so
the module tree is the same), the tiny MoE organism that model upcycled with `tiny_moe_organism.yaml`'s recipe.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from subspace.families import SITE_KINDS, CausalFamily, family_for
from subspace.models.tiny import tiny_llama, tiny_tokenizer
from subspace.organisms.upcycle import upcycle_llama
from tests.conftest import ROOT, TINY_ORGANISM

MOE_RECIPE = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny_moe_organism.yaml").recipe)


def organism_architecture():
    kwargs = TINY_ORGANISM["base_kwargs"]
    tok = tiny_tokenizer()
    return tiny_llama(len(tok), kwargs["hidden_size"], kwargs["num_layers"], kwargs["seed"], tok.pad_token_id,
                      tok.eos_token_id)


def sites(model, kinds=None):
    family = family_for(model)
    assert type(family) is CausalFamily
    chosen = family.writer_sites() if kinds is None else family.writer_sites(kinds=kinds)
    return [(s.name, s.layer, s.kind, s.experts, s.expert) for s in chosen]


def test_tiny_organism_sites_are_pinned():
    model = organism_architecture()
    expected = []
    for i in range(4):
        expected += [(f"model.layers.{i}.self_attn.o_proj", i, "attn_out", None, None),
                     (f"model.layers.{i}.mlp.down_proj", i, "mlp_out", None, None)]
    assert sites(model) == expected
    assert sites(model, SITE_KINDS) == expected
    assert family_for(model).layers_path == "model.layers"


def test_tiny_moe_organism_sites_are_pinned():
    model = upcycle_llama(organism_architecture(), MOE_RECIPE["num_experts"], MOE_RECIPE["top_k"], MOE_RECIPE["noise"],
                          MOE_RECIPE["router_std"], MOE_RECIPE["aux_loss_coef"], seed=MOE_RECIPE["seed"])
    expected, blocks = [], []
    for i in range(4):
        expected += [(f"model.layers.{i}.self_attn.o_proj", i, "attn_out", None, None),
                     (f"model.layers.{i}.mlp.experts.down_proj", i, "expert_out", f"model.layers.{i}.mlp.experts",
                      None)]
        blocks += [(f"model.layers.{i}.self_attn.o_proj", i, "attn_out", None, None),
                   (f"model.layers.{i}.mlp", i, "moe_out", f"model.layers.{i}.mlp.experts", None),
                   (f"model.layers.{i}.mlp.experts.down_proj", i, "expert_out", f"model.layers.{i}.mlp.experts",
                    None)]
    assert sites(model) == expected
    assert sites(model, SITE_KINDS) == blocks
    family = family_for(model)
    assert sorted(family.moe_blocks) == [0, 1, 2, 3]
    assert [family.residual_entry(s) for s in family.writer_sites()[:2]] == ["model.layers.0.self_attn.o_proj",
                                                                            "model.layers.0.mlp"]
