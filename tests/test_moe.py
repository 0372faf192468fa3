"""Mixture of experts: the edit reaches every expert slice (the finding as tests), on tiny random Qwen3-MoE, OLMoE,
Mixtral and Qwen2-MoE (shared expert) models in float32.

transformers 5.24 keeps no causal LM with a ModuleList of Linear experts, so that layout is tested with
`ModuleListExperts`, a synthetic drop-in for a fused experts module (same call, same weights, one Linear per
expert).
"""

from __future__ import annotations

import copy
import logging
import warnings

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from subspace.data.prompt_sets import PromptSets
from subspace.evaluation.evaluator import Evaluator
from subspace.export.peft_adapter import export_peft_adapter, load_peft_adapter, save_merged_model
from subspace.families import CausalFamily
from subspace.interventions import ProjectionEdit, ProjectionHooks, orthonormalize
from subspace.methods.base import RunContext
from subspace.methods.diff_means import DiffMeans
from subspace.methods.moe_scope import MOE_SCOPES, scoped_sites
from subspace.methods.subspace import Subspace
from subspace.models.bundle import ModelBundle
from subspace.models.tiny import tiny_tokenizer
from subspace.objectives.refusal_kl import RefusalKLObjective
from tests.conftest import EXPERTS, HIDDEN, KINDS, LAYERS, moe_layers, tiny_moe, token_ids

TOL = 1e-5  # float32: what is left along U relative to the output's norm


class Expert(nn.Module):
    def __init__(self, gate: Tensor, up: Tensor, down: Tensor):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(*gate.T.shape, bias=False), nn.Linear(*up.T.shape, bias=False)
        self.down_proj = nn.Linear(*down.T.shape, bias=False)
        for linear, weight in ((self.gate_proj, gate), (self.up_proj, up), (self.down_proj, down)):
            linear.weight.data.copy_(weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class ModuleListExperts(nn.ModuleList):
    """The ModuleList layout of a fused experts module: one Expert per slice, called as `(hidden, top_k_index,
    top_k_weights)` like the fused module it replaces (all four test classes use SiLU experts)."""

    def __init__(self, fused: nn.Module):
        gate, up = fused.gate_up_proj.detach().chunk(2, dim=1)
        super().__init__(Expert(g, u, d) for g, u, d in zip(gate, up, fused.down_proj.detach()))

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if token.numel():
                out.index_add_(0, token, expert(hidden_states[token]) * top_k_weights[token, slot, None])
        return out


def as_modulelist(model: nn.Module) -> nn.Module:
    """The model with ModuleList experts, as a custom model: its model_type is renamed, since PEFT reads a
    transformers-5 MoE type (qwen3_moe, olmoe, …) as fused and would convert per-expert adapter keys to fused ones."""
    for layer in model.model.layers:
        if hasattr(layer.mlp, "experts"):
            layer.mlp.experts = ModuleListExperts(layer.mlp.experts)
    model.config.model_type = "custom_modulelist_moe"
    return model


def global_edit(sites, u: Tensor, strength: float = 1.0, masks: dict | None = None) -> ProjectionEdit:
    names = [s.name if hasattr(s, "name") else s for s in sites]
    return ProjectionEdit(names, u.expand(len(names), -1, -1), torch.full((len(names),), strength), {}, masks or {})


def direction(seed: int = 1, rank: int = 2) -> Tensor:
    return orthonormalize(torch.randn(HIDDEN, rank, generator=torch.Generator().manual_seed(seed)))


def along(out: Tensor, u: Tensor) -> Tensor:
    """Per token: the norm of the component in span(U), relative to the output's norm."""
    return (out @ u).norm(dim=-1) / out.norm(dim=-1)


def forced(experts: nn.Module, hidden: Tensor, expert: int) -> Tensor:
    """The experts module's output with every token routed to `expert` alone, weight 1."""
    index = torch.full((hidden.shape[0], 1), expert, dtype=torch.long)
    return experts(hidden, index, torch.ones(hidden.shape[0], 1))


# --- 1. the family reports the expert slices ----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_writer_sites_report_the_expert_down_projections(kind):
    model = tiny_moe(kind)
    family = CausalFamily(model)
    sites = family.writer_sites()
    attention = [f"model.layers.{i}.self_attn.o_proj" for i in range(LAYERS)]
    assert [s.name for s in sites if s.kind == "attn_out"] == attention
    moe = [i for i, _ in moe_layers(model)]
    assert sorted(family.moe_blocks) == moe == ([1, 2] if kind == "qwen3_moe" else [0, 1, 2])
    experts = [s for s in sites if s.kind == "expert_out"]
    assert [s.name for s in experts] == [f"model.layers.{i}.mlp.experts.down_proj" for i in moe]
    assert all(s.experts == f"model.layers.{s.layer}.mlp.experts" and s.expert is None for s in experts)
    dense = ["model.layers.0.mlp.down_proj"] if kind == "qwen3_moe" else []
    assert [s.name for s in sites if s.kind == "mlp_out"] == dense
    shared = [s.name for s in sites if s.kind == "shared_expert_out"]
    assert shared == ([f"model.layers.{i}.mlp.shared_expert.down_proj" for i in moe] if kind == "qwen2_moe" else [])
    blocks = family.writer_sites(kinds=("attn_out", "mlp_out", "moe_out"))
    assert [s.name for s in blocks if s.kind == "moe_out"] == [f"model.layers.{i}.mlp" for i in moe]


def test_writer_sites_of_modulelist_experts_name_each_expert_linear():
    fused = tiny_moe("qwen3_moe")
    ids = token_ids()
    model = as_modulelist(copy.deepcopy(fused))
    assert torch.allclose(model(ids).logits, fused(ids).logits, atol=1e-5)  # the synthetic layout is the same model
    sites = [s for s in CausalFamily(model).writer_sites() if s.kind == "expert_out"]
    assert [(s.name, s.expert) for s in sites] == [(f"model.layers.{i}.mlp.experts.{e}.down_proj", e)
                                                   for i in (1, 2) for e in range(EXPERTS)]


def test_expert_biases_the_module_declares_but_does_not_hold_are_refused():
    """Experts that say they add biases but hold no `<writer>_bias` would have them missed by the edit: refused, by
    name. (Transposed and biased experts, gpt-oss, are edited: tests/test_architectures.py.)"""
    model = tiny_moe("olmoe")
    model.model.layers[0].mlp.experts.has_bias = True
    with pytest.raises(TypeError, match="OlmoeExperts declares expert biases but holds no down_proj_bias"):
        CausalFamily(model).writer_sites()


def test_unknown_writer_kind_is_refused():
    with pytest.raises(ValueError, match=r"unknown writer kinds \['expert'\]; valid kinds are"):
        CausalFamily(tiny_moe("mixtral")).writer_sites(kinds=("expert",))


# --- 3. router forcing: all_experts reaches every expert, active_only does not --------------------------------


@pytest.mark.parametrize("layout", ["fused", "modulelist"])
@pytest.mark.parametrize("kind", KINDS)
def test_all_experts_edit_removes_the_direction_from_every_expert(kind, layout):
    model = tiny_moe(kind) if layout == "fused" else as_modulelist(tiny_moe(kind))
    family, u = CausalFamily(model), direction()
    edit = global_edit(family.writer_sites(), u)
    hidden = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(2))
    for _, block in moe_layers(model):
        for e in range(EXPERTS):
            assert along(forced(block.experts, hidden, e), u).mean() > 1e-2  # unedited: the direction is there
            for form in (edit.applied, edit.merged):
                with form(model):
                    assert along(forced(block.experts, hidden, e), u).max() < TOL, (form.__name__, e)


@pytest.mark.parametrize("kind", KINDS)
def test_all_experts_edit_holds_when_the_router_is_forced_inside_the_model(kind):
    """Every token routed to expert e by the router itself: the MoE block (shared expert included) writes nothing
    along U, in both forms."""
    model = tiny_moe(kind)
    family, u = CausalFamily(model), direction()
    edit = global_edit(family.writer_sites(), u)
    outputs: list[Tensor] = []
    for _, block in moe_layers(model):
        block.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    for e in range(EXPERTS):
        handles = [block.gate.register_forward_hook(
            lambda _m, _i, out, e=e: (out[0], torch.ones_like(out[1][:, :1]), torch.full_like(out[2][:, :1], e)))
            for _, block in moe_layers(model)]
        for form in (edit.applied, edit.merged):
            outputs.clear()
            with form(model):
                model(token_ids())
            assert len(outputs) == len(moe_layers(model))
            assert max(along(out, u).max() for out in outputs) < TOL, (form.__name__, e)
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("layout", ["fused", "modulelist"])
@pytest.mark.parametrize("kind", KINDS)
def test_active_only_leaves_the_direction_in_experts_that_did_not_fire(kind, layout):
    model = tiny_moe(kind) if layout == "fused" else as_modulelist(tiny_moe(kind))
    family, tok, u = CausalFamily(model), tiny_tokenizer(), direction()
    with family.recorded_routing() as fired:
        model(**family.chat_batch(tok, ["Hi"]))
    assert all(f.any() for f in fired.values())
    assert all(not f.all() for f in fired.values())  # in every MoE layer some expert never fired on the prompt
    scoped = scoped_sites(family, None, "active_only", fired)
    edit = global_edit(scoped.sites, u, masks=scoped.expert_masks)
    hidden = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(2))
    for i, block in moe_layers(model):
        active = fired[f"model.layers.{i}.mlp.experts"]
        originals = [forced(block.experts, hidden, e) for e in range(EXPERTS)]
        for form in (edit.applied, edit.merged):
            with form(model):
                for e in range(EXPERTS):
                    out = forced(block.experts, hidden, e)
                    if active[e]:
                        assert along(out, u).max() < TOL
                    else:  # untouched: the router can still route the direction through it
                        assert torch.allclose(out, originals[e], atol=1e-7) and along(out, u).mean() > 1e-2


def test_recorded_routing_ignores_padding():
    model = tiny_moe("olmoe")
    family, tok = CausalFamily(model), tiny_tokenizer()
    batch = family.chat_batch(tok, ["Hi", "Tell me a long story about a dragon who learned to bake bread in a castle"])
    assert (batch["attention_mask"] == 0).any()
    expected: dict[int, set[int]] = {}
    real = batch["attention_mask"].reshape(-1).bool()
    handles = [block.gate.register_forward_hook(
        lambda _m, _i, out, i=i: expected.setdefault(i, set()).update(out[2][real].reshape(-1).tolist()))
        for i, block in moe_layers(model)]
    with family.recorded_routing() as fired:
        model(**batch)
    for handle in handles:
        handle.remove()
    for i, _ in moe_layers(model):
        assert set(fired[f"model.layers.{i}.mlp.experts"].nonzero().reshape(-1).tolist()) == expected[i]


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe"])
def test_layer_output_projects_the_block_output_and_leaves_the_experts(kind):
    model = tiny_moe(kind)
    family, u = CausalFamily(model), direction()
    edit = global_edit(scoped_sites(family, None, "layer_output").sites, u)
    assert not any(s.endswith("down_proj") and "experts" in s for s in edit.sites)
    outputs: list[Tensor] = []
    hidden = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(2))
    with edit.applied(model):  # recording hooks registered after the projection's, so they see its result
        handles = [block.register_forward_hook(lambda _m, _i, out: outputs.append(out))
                   for _, block in moe_layers(model)]
        model(token_ids())
        still = [along(forced(block.experts, hidden, e), u).mean()
                 for _, block in moe_layers(model) for e in range(EXPERTS)]
    for handle in handles:
        handle.remove()
    assert len(outputs) == len(moe_layers(model)) and max(along(out, u).max() for out in outputs) < TOL
    assert min(still) > 1e-2  # the experts themselves still write the direction
    with pytest.raises(ValueError, match="no weight form.*moe_scope=all_experts"):
        edit.weight_deltas(model)


# --- 2. training form: differentiable, vectorised, always restored ---------------------------------------------


def test_expert_weight_edit_is_differentiable_and_the_weights_are_restored_even_on_error():
    """The weight swap (forced: Mixtral's all-experts sites would otherwise be projected at the experts' output)."""
    model = tiny_moe("mixtral")
    family = CausalFamily(model)
    sites = [s.name for s in family.writer_sites() if s.kind == "expert_out"]
    raw = torch.randn(len(sites), HIDDEN, 2, requires_grad=True)
    params = {name: model.get_parameter(name) for name in sites}
    with ProjectionHooks.for_sites(model, sites, lean_experts=False) as hooks:
        assert hooks.paths == ["weight"] * len(sites)
        hooks.set(orthonormalize(raw), torch.ones(len(sites)))
        model(token_ids()).logits.square().mean().backward()
        assert raw.grad is not None and raw.grad.abs().sum() > 0
        experts = model.model.layers[0].mlp.experts
        with pytest.raises(RuntimeError):
            experts(torch.randn(3, HIDDEN + 1), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
        assert experts.down_proj is params[sites[0]]  # restored after the failed forward
    assert all(model.get_parameter(name) is p for name, p in params.items())


# --- 4. export: merged checkpoint and PEFT adapter reproduce the edited model -----------------------------------


@pytest.mark.parametrize("scope", ["all_experts", "active_only"])
@pytest.mark.parametrize("layout", ["fused", "modulelist"])
@pytest.mark.parametrize("kind", KINDS)
def test_peft_adapter_reproduces_the_edited_logits(tmp_path, kind, layout, scope):
    model = tiny_moe(kind) if layout == "fused" else as_modulelist(tiny_moe(kind))
    family, tok = CausalFamily(model), tiny_tokenizer()
    with family.recorded_routing() as fired:
        model(**family.chat_batch(tok, ["Hi"]))
    scoped = scoped_sites(family, None, scope, fired)
    g = torch.Generator().manual_seed(3)
    edit = ProjectionEdit(scoped.names, orthonormalize(torch.randn(len(scoped.sites), HIDDEN, 3, generator=g)),
                          torch.rand(len(scoped.sites), generator=g) * 0.5 + 0.5, {}, scoped.expert_masks)
    ids = token_ids(12)
    original = model(ids).logits
    with edit.applied(model):
        expected = model(ids).logits
    assert (expected - original).abs().max() > 1e-4  # the edit does something
    with edit.merged(model):
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter_dir = export_peft_adapter(edit, model, tmp_path / "adapter")
        adapter = load_peft_adapter(copy.deepcopy(model), adapter_dir)
    assert not [str(w.message) for w in caught if "adapter keys" in str(w.message)]  # every factor loaded
    assert sum("lora_" in name for name, _ in adapter.named_parameters()) == 2 * len(edit.sites)  # one pair a site
    assert torch.allclose(adapter.eval()(ids).logits, expected, atol=1e-5)
    assert torch.equal(model(ids).logits, original)  # the model itself is untouched
    if layout == "fused":  # a ModuleList model is not a transformers class, so it does not reload from disk
        save_merged_model(edit, model, tok, tmp_path / "merged")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert torch.allclose(reloaded(ids).logits, expected, atol=1e-5)


def test_edit_with_expert_masks_round_trips(tmp_path):
    family = CausalFamily(tiny_moe("olmoe"))
    sites = [s.name for s in family.writer_sites()]
    mask = torch.tensor([True, False] * (EXPERTS // 2))
    edit = global_edit(sites, direction(), 0.7, {sites[1]: mask})
    edit.save(tmp_path / "edit.safetensors")
    loaded = ProjectionEdit.load(tmp_path / "edit.safetensors")
    assert loaded.sites == sites and list(loaded.expert_masks) == [sites[1]]
    assert torch.equal(loaded.expert_masks[sites[1]], mask) and torch.equal(loaded.bases, edit.bases)
    with pytest.raises(ValueError, match="expected \\(16,\\): one flag per expert"):
        global_edit(sites, direction(), masks={sites[1]: torch.ones(3, dtype=torch.bool)}).weight_deltas(family.model)


# --- methods: moe_scope, and each method's edit on a tiny MoE model ---------------------------------------------


def test_bad_moe_scope_is_refused_naming_the_valid_ones():
    for make in (lambda: DiffMeans(moe_scope="some"),
                 lambda: Subspace(objective=RefusalKLObjective(), moe_scope="some")):
        with pytest.raises(ValueError, match=r"method.moe_scope='some' is not one of \('all_experts', 'active_only', "
                                             r"'layer_output'\)"):
            make()


def test_moe_scope_is_ignored_with_a_note_on_dense_models(tiny, family, caplog):
    with caplog.at_level(logging.WARNING):
        scoped = scoped_sites(family, None, "active_only", {})
    assert [s.name for s in scoped.sites] == [s.name for s in family.writer_sites()] and not scoped.expert_masks
    assert "moe_scope=active_only is ignored: LlamaForCausalLM has no mixture-of-experts layer" in caplog.text


def moe_context(tmp_path, kind: str = "qwen3_moe", make_trainer=None) -> RunContext:
    tok = tiny_tokenizer()
    bundle = ModelBundle(tiny_moe(kind), tok, f"tiny-{kind}")
    family = CausalFamily(bundle.model)
    data = PromptSets("builtin:harmful_train", "builtin:harmless_train", "builtin:harmful_heldout",
                      "builtin:harmless_heldout", n_select=2, train_limit=4, eval_harmless_limit=2)
    return RunContext(bundle, family, data, Evaluator(bundle, family, progress=False), tmp_path, make_trainer)


@pytest.mark.parametrize("scope", MOE_SCOPES)
def test_diff_means_builds_its_edit_on_a_moe_model(tmp_path, scope):
    ctx = moe_context(tmp_path)
    edit = DiffMeans(source_layer=1, moe_scope=scope).fit(ctx)
    fused = [f"model.layers.{i}.mlp.experts.down_proj" for i in (1, 2)]
    if scope == "layer_output":
        assert {"model.layers.1.mlp", "model.layers.2.mlp"} <= set(edit.sites) and not set(fused) & set(edit.sites)
    else:
        assert set(fused) <= set(edit.sites)
    assert set(edit.expert_masks) == (set(fused) if scope == "active_only" else set())
    assert edit.meta["source_layer"] == 1 and torch.allclose(edit.bases.norm(dim=1), torch.ones(len(edit.sites), 1))
    with edit.applied(ctx.bundle.model):
        ctx.bundle.model(token_ids())


class FixedRefusalTokens(RefusalKLObjective):
    """A random model refuses nothing: the tokens the loss pushes down are fixed instead of probed."""

    def refusal_token_ids(self, evaluator, harmful) -> Tensor:
        return torch.tensor([5, 7])


@pytest.mark.parametrize("scope", ["all_experts", "active_only"])
def test_subspace_trains_through_the_expert_slices_on_a_moe_model(tmp_path, scope):
    trainer = lambda: L.Trainer(max_steps=2, max_epochs=-1, accelerator="cpu", logger=False,  # noqa: E731
                                enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                                default_root_dir=tmp_path)
    ctx = moe_context(tmp_path, "olmoe", trainer)
    method = Subspace(objective=FixedRefusalTokens(), rank=2, layers=[1, 2], batch_size=2, max_length=64,
                      learn_strength=False, strength_init=0.5, moe_scope=scope)
    before = {n: p.clone() for n, p in ctx.bundle.model.named_parameters()}
    edit = method.fit(ctx)
    fused = ["model.layers.1.mlp.experts.down_proj", "model.layers.2.mlp.experts.down_proj"]
    assert set(fused) <= set(edit.sites) and set(edit.expert_masks) == (set(fused) if scope == "active_only" else set())
    assert edit.meta["moe_scope"] == scope
    assert all(torch.equal(p, before[n]) for n, p in ctx.bundle.model.named_parameters())  # base model untouched
