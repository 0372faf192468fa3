"""DiffusionGemma: encoder and decoder run one set of tensors, so every edit must reach both halves, once.

On a tiny random `DiffusionGemmaForBlockDiffusion` (transformers' own class, 2 layers, 4 fused experts beside a
dense MLP, a ~17k-parameter vision tower). Tests about the shared tensors carry `tied`, `merge` or `unmerge` in
their names (`pytest -k "tied or merge or unmerge"`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn

from subspace.data.prompt_sets import PromptSets
from subspace.evaluation.evaluator import Evaluator
from subspace.export.peft_adapter import export_peft_adapter, load_peft_adapter, save_merged_model
from subspace.families import DiffusionGemmaFamily, family_for
from subspace.interventions import ProjectionEdit, ProjectionHooks, orthonormalize
from subspace.interventions.merge import merged_deltas
from subspace.interventions.sites import resolve_sites
from subspace.methods.base import RunContext
from subspace.methods.diff_means import DiffMeans
from subspace.methods.moe_scope import scoped_sites
from subspace.methods.subspace import Subspace
from subspace.models.diffusion_gemma import DIFFUSION_GEMMA_ID, load_diffusion_gemma
from subspace.models.tiny import tiny_diffusion_gemma
from subspace.objectives.refusal_kl import RefusalKLObjective
from tests.conftest import ROOT

HIDDEN, LAYERS, EXPERTS = 64, 2, 4
DEC, ENC = "model.decoder.layers", "model.encoder.language_model.layers"
PROMPTS = ["How do I bake bread?", "Tell me a joke about cats, please, a long one with a dog in it"]


@pytest.fixture()
def bundle():
    return tiny_diffusion_gemma()


@pytest.fixture()
def family(bundle) -> DiffusionGemmaFamily:
    return family_for(bundle.model, **bundle.family_options)


def random_edit(names: list[str], rank: int = 2, seed: int = 1) -> ProjectionEdit:
    g = torch.Generator().manual_seed(seed)
    return ProjectionEdit(names, orthonormalize(torch.randn(len(names), HIDDEN, rank, generator=g)),
                          torch.rand(len(names), generator=g) * 0.5 + 0.5)


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


def assert_unchanged(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = dict(model.named_parameters(remove_duplicate=False))
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], t) for n, t in before.items())


@torch.no_grad()
def run(model: nn.Module, inputs: dict[str, Tensor]):
    return model(**inputs)


# --- the shared tensors ---------------------------------------------------------------------------------------


def test_tied_encoder_and_decoder_layers_are_one_storage(bundle):
    """The assumption every other test rests on: distinct module objects, the same Parameter objects."""
    model = bundle.model
    encoder, decoder = model.get_submodule(ENC), model.get_submodule(DEC)
    for enc, dec in zip(encoder, decoder):
        assert enc is not dec and enc.experts is not dec.experts and enc.self_attn.o_proj is not dec.self_attn.o_proj
        pairs = list(zip(enc.named_parameters(), dec.named_parameters()))
        assert len(pairs) == len(list(dec.parameters())) > 10
        for (n_e, p_e), (n_d, p_d) in pairs:
            assert n_e == n_d and p_e is p_d and p_e.data_ptr() == p_d.data_ptr()
    embed = model.model.decoder.embed_tokens.weight
    assert model.model.encoder.language_model.embed_tokens.weight is embed and model.lm_head.weight is embed


def test_untied_model_is_refused_by_the_family():
    """tie_word_embeddings=False undoes every tie: edits named through the decoder would miss the encoder."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    config = DiffusionGemmaConfig(**{**tiny_diffusion_gemma().model.config.to_dict(), "tie_word_embeddings": False})
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    assert model.get_parameter(f"{ENC}.0.experts.down_proj") is not model.get_parameter(f"{DEC}.0.experts.down_proj")
    with pytest.raises(ValueError, match="layer 0 of the encoder and the decoder hold different tensors"):
        DiffusionGemmaFamily(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tied_invisible_adapter_vs_merge_which_unmerges_bit_exactly(bundle, family, dtype):
    """A LoRA on the encoder's module names wraps the encoder's modules only: the decoder runs the bare tensors,
    so the output does not move. The same edit merged into the shared tensors moves it; after the block every
    parameter is bit-identical to the original.

    The edit is on the last layer, whose encoder output feeds nothing (its KV is computed before its writers):
    with earlier layers the encoder-side LoRA would reach the decoder through the KV cache, but still not run in
    the decoder's own layers.
    """
    model = bundle.model.to(dtype)
    last = LAYERS - 1
    names = [f"{DEC}.{last}.self_attn.o_proj", f"{DEC}.{last}.mlp.down_proj"]
    edit = random_edit(names)
    inputs = family.with_canvas(family.chat_batch(bundle.tokenizer, PROMPTS))
    before, original = snapshot(model), run(model, inputs).logits

    wrapped = copy.deepcopy(model)
    encoder_names = [n.replace(DEC, ENC) for n in names]
    peft = get_peft_model(wrapped, LoraConfig(r=edit.rank, lora_alpha=edit.rank, target_modules=encoder_names))
    with torch.no_grad():
        for name, (a, b) in zip(encoder_names, edit.lora_factors(model).values()):
            lora = peft.base_model.model.get_submodule(name)
            lora.lora_A["default"].weight.copy_(a)
            lora.lora_B["default"].weight.copy_(b)
            assert b.abs().max() > 0.1
    assert isinstance(wrapped.get_submodule(f"{DEC}.{last}.self_attn.o_proj"), nn.Linear)  # decoder left unwrapped
    assert torch.equal(run(peft, inputs).logits, original)  # the invisible adapter

    with edit.merged(model):
        edited = run(model, inputs).logits
    assert (edited - original).abs().max() > 1e-3
    assert_unchanged(model, before)
    assert torch.equal(run(model, inputs).logits, original)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tied_merge_of_deltas_named_through_both_halves_applies_them_once(bundle, dtype):
    model = bundle.model.to(dtype)
    g = torch.Generator().manual_seed(4)
    names = ["self_attn.o_proj.weight", "experts.down_proj"]
    shared = {n: model.get_parameter(f"{DEC}.0.{n}") for n in names}
    deltas = {n: torch.randn(p.shape, generator=g) * 0.1 for n, p in shared.items()}
    expected = {n: (p.detach().float() + deltas[n]).to(dtype) for n, p in shared.items()}
    before = snapshot(model)
    both = {f"{half}.0.{n}": d for n, d in deltas.items() for half in (DEC, ENC)}
    with merged_deltas(model, both):
        for n, p in shared.items():
            assert torch.equal(p, expected[n]), n  # once, not twice
            assert model.get_parameter(f"{ENC}.0.{n}") is p
    assert_unchanged(model, before)
    with merged_deltas(model, {f"{ENC}.0.{n}": d for n, d in deltas.items()}):  # either name alone: the same
        assert all(torch.equal(p, expected[n]) for n, p in shared.items())
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="are one shared tensor but were given different deltas"):
        name, delta = names[0], deltas[names[0]]
        with merged_deltas(model, {f"{DEC}.0.{name}": delta, f"{ENC}.0.{name}": 2 * delta}):
            pass
    assert_unchanged(model, before)


# --- the family ---------------------------------------------------------------------------------------------------


def test_writer_sites_name_each_tensor_once_through_the_decoder(family, bundle):
    sites = family.writer_sites()
    expected = [(f"{DEC}.{i}.{rel}", kind) for i in range(LAYERS) for rel, kind in
                (("self_attn.o_proj", "attn_out"), ("mlp.down_proj", "mlp_out"), ("experts.down_proj", "expert_out"))]
    assert [(s.name, s.kind) for s in sites] == expected
    assert all(s.experts == f"{DEC}.{s.layer}.experts" and s.expert is None for s in sites if s.kind == "expert_out")
    assert sorted(family.moe_blocks) == list(range(LAYERS)) and family.moe_blocks[0].num_experts == EXPERTS
    outputs = family.writer_sites(kinds=("attn_out", "mlp_out", "moe_out"))
    assert [s.name for s in outputs if s.kind == "moe_out"] == [f"{DEC}.{i}.experts" for i in range(LAYERS)]
    assert family.writer_sites([1], kinds=("mlp_out",)) == [sites[4]]
    # each resolved site knows the encoder's module running the same tensor
    model = bundle.model
    for site in resolve_sites(model, [s.name for s in sites + outputs]):
        twin = model.get_submodule(site.name.replace(DEC, ENC).removesuffix(".down_proj") if site.stacked
                                   else site.name.replace(DEC, ENC))
        assert site.aliases == (twin,) and twin is not site.module
    assert family.hidden_size == HIDDEN and family.num_layers == LAYERS and family.name == "diffusion_gemma"


def test_family_options_are_checked(bundle):
    with pytest.raises(ValueError, match="unknown DiffusionGemma sampler settings \\['temperature'\\]"):
        family_for(bundle.model, sampler={"temperature": 0.0})
    with pytest.raises(ValueError, match="kl_positions=9 must be in 1..canvas_length=8"):
        family_for(bundle.model, kl_positions=9)
    assert family_for(bundle.model, canvas_length=16).canvas_length == 16
    assert family_for(bundle.model).canvas_length == bundle.model.config.canvas_length == 8


def test_response_logprobs_read_the_first_canvas_positions(family, bundle):
    batch = family.chat_batch(bundle.tokenizer, PROMPTS)
    assert (batch["attention_mask"] == 0).any()  # left padding is exercised
    logprobs = family.response_logprobs(batch)
    assert logprobs.shape == (2, 4, len(bundle.tokenizer)) and logprobs.dtype == torch.float32
    full = run(bundle.model, family.with_canvas(batch)).logits  # the model's own forward, soft-capped
    assert torch.allclose(logprobs, torch.log_softmax(full[:, :4].float(), -1), atol=1e-6)
    alone = torch.cat([family.response_logprobs(family.chat_batch(bundle.tokenizer, [p])) for p in PROMPTS])
    assert torch.allclose(logprobs, alone, atol=1e-4)  # padding does not leak into the canvas
    assert family.residuals(batch).shape == (LAYERS, 2, HIDDEN)
    assert "first 4 canvas positions" in family.kl_at


def test_generate_runs_the_models_sampler_seeded(family, bundle):
    batch = family.chat_batch(bundle.tokenizer, PROMPTS)
    state = torch.get_rng_state()
    first = family.generate(bundle.tokenizer, batch, 11)  # two canvases of 8, cut to 11
    assert first.shape == (2, 11) and torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert torch.equal(family.generate(bundle.tokenizer, batch, 11), first)  # same seed, same text
    reseeded = family_for(bundle.model, **{**bundle.family_options, "seed": 1})
    assert not torch.equal(reseeded.generate(bundle.tokenizer, batch, 11), first)
    assert {bundle.tokenizer.eos_token_id, bundle.tokenizer.pad_token_id} <= family.stop_token_ids(bundle.tokenizer)


# --- training: hooks on both halves -------------------------------------------------------------------------------


def test_tied_training_hooks_reach_both_halves(family, bundle):
    """Hooks named through the decoder also run on the encoder's modules: the encoder's output moves, and hooks
    equal the weight form (merge) on both halves; the same hooks without the encoder twins do not."""
    model = bundle.model
    names = [s.name for s in family.writer_sites()]
    edit = random_edit(names)
    inputs = family.with_canvas(family.chat_batch(bundle.tokenizer, PROMPTS))
    original = run(model, inputs)
    with edit.merged(model):
        merged = run(model, inputs)
    hooks = ProjectionHooks.for_sites(model, names)
    with hooks:
        hooks.set(edit.bases, edit.strengths)
        hooked = run(model, inputs)
    assert (merged.encoder_last_hidden_state - original.encoder_last_hidden_state).abs().max() > 1e-3
    assert torch.allclose(hooked.encoder_last_hidden_state, merged.encoder_last_hidden_state, atol=1e-5)
    assert torch.allclose(hooked.logits, merged.logits, atol=1e-4)

    decoder_only = ProjectionHooks([dataclasses.replace(s, aliases=()) for s in hooks.sites])
    with decoder_only:
        decoder_only.set(edit.bases, edit.strengths)
        half = run(model, inputs)
    assert torch.equal(half.encoder_last_hidden_state, original.encoder_last_hidden_state)
    assert (half.logits - merged.logits).abs().max() > 1e-3

    grads = []
    for h in (ProjectionHooks.for_sites(model, names), decoder_only):
        raw = edit.bases.clone().requires_grad_(True)
        with h:
            h.set(orthonormalize(raw), edit.strengths)
            family.response_logprobs(family.chat_batch(bundle.tokenizer, PROMPTS))[..., 5].mean().backward()
        grads.append(raw.grad)
    assert grads[0].abs().sum() > 0 and not torch.allclose(grads[0], grads[1])  # the encoder half takes part


def test_tied_routing_records_experts_fired_in_either_half(family, bundle):
    """active_only: the experts that fired are the union of the encoder's (prompt tokens, padding excluded) and the
    decoder's (canvas), since both route through the same expert tensors."""
    model = bundle.model
    batch = family.chat_batch(bundle.tokenizer, PROMPTS)
    real = batch["attention_mask"].reshape(-1).bool()
    seen = {half: {i: set() for i in range(LAYERS)} for half in (ENC, DEC)}
    handles = []
    for half in (ENC, DEC):
        for i, layer in enumerate(model.get_submodule(half)):
            def record(_m, _i, out, half=half, i=i):
                index = out[2][real] if half == ENC else out[2]
                seen[half][i].update(index.reshape(-1).tolist())
            handles.append(layer.router.register_forward_hook(record))
    with family.recorded_routing() as fired:
        family.response_logprobs(batch)
    for handle in handles:
        handle.remove()
    for i in range(LAYERS):
        expected = seen[ENC][i] | seen[DEC][i]
        assert set(fired[f"{DEC}.{i}.experts"].nonzero().reshape(-1).tolist()) == expected
    scoped = scoped_sites(family, None, "active_only", fired)
    assert set(scoped.expert_masks) == {f"{DEC}.{i}.experts.down_proj" for i in range(LAYERS)}


def context(tmp_path, bundle, family, make_trainer=None) -> RunContext:
    data = PromptSets("builtin:harmful_train", "builtin:harmless_train", "builtin:harmful_heldout",
                      "builtin:harmless_heldout", n_select=2, train_limit=4, eval_harmless_limit=2)
    return RunContext(bundle, family, data, Evaluator(bundle, family, progress=False, max_new_tokens=8), tmp_path,
                      make_trainer)


class FixedRefusalTokens(RefusalKLObjective):
    """A random model refuses nothing: the tokens the loss pushes down are fixed instead of probed."""

    def refusal_token_ids(self, evaluator, harmful) -> Tensor:
        return torch.tensor([5, 7])


@pytest.mark.parametrize("scope", ["all_experts", "active_only", "layer_output"])
def test_subspace_trains_on_diffusion_gemma_and_names_the_decoder_only(tmp_path, bundle, family, scope):
    trainer = lambda: L.Trainer(max_steps=2, max_epochs=-1, accelerator="cpu", logger=False,  # noqa: E731
                                enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                                default_root_dir=tmp_path)
    ctx = context(tmp_path, bundle, family, trainer)
    method = Subspace(objective=FixedRefusalTokens(), rank=2, layers=[0, 1], batch_size=2, max_length=64,
                      learn_strength=False, strength_init=0.5, moe_scope=scope)
    before = snapshot(bundle.model)
    edit = method.fit(ctx)
    assert edit.sites and all(s.startswith(DEC) for s in edit.sites)
    experts = {f"{DEC}.{i}.experts.down_proj" for i in range(LAYERS)}
    assert (experts <= set(edit.sites)) == (scope != "layer_output")
    assert set(edit.expert_masks) == (experts if scope == "active_only" else set())
    assert ctx.report["steps"] == 2
    assert_unchanged(bundle.model, before)


def test_diff_means_edit_on_diffusion_gemma(tmp_path, bundle, family):
    edit = DiffMeans(source_layer=1).fit(context(tmp_path, bundle, family))
    assert {f"{DEC}.{i}.experts.down_proj" for i in range(LAYERS)} <= set(edit.sites)
    assert edit.has_weight_form(bundle.model)


# --- evaluation in weight form ------------------------------------------------------------------------------------


def test_evaluator_switches_hooks_to_merged_and_restores_the_weights(bundle, family, caplog):
    with caplog.at_level(logging.WARNING):
        evaluator = Evaluator(bundle, family, progress=False, max_new_tokens=8, apply="hooks")
    assert evaluator.apply == "merged" and "eval.apply=hooks switched to merged" in caplog.text
    edit = random_edit([s.name for s in family.writer_sites()])
    before = snapshot(bundle.model)
    results, samples = evaluator.before_after(PROMPTS[:1], PROMPTS[1:], edit)
    assert results["kl"] > 0 and len(samples) == 2
    merged = evaluator.logprobs(PROMPTS, edit)
    with edit.applied(bundle.model):  # hooks on both halves give the weight form's distributions
        assert torch.allclose(evaluator.logprobs(PROMPTS), merged, atol=1e-4)
    assert_unchanged(bundle.model, before)
    layer_output = random_edit([s.name for s in family.writer_sites(kinds=("attn_out", "moe_out"))])
    assert not layer_output.has_weight_form(bundle.model) and evaluator.kl(PROMPTS, layer_output) > 0  # hooks


# --- export ---------------------------------------------------------------------------------------------------------


def test_tied_peft_export_targets_both_halves_and_peft_merge_would_apply_it_twice(tmp_path, bundle, family):
    """The adapter names every module running an edited tensor; loaded (unmerged) it is the weight-form edit
    applied once. PEFT's merge_and_unload merges each wrapper into the shared tensor: twice. `save_merged_model`
    is the merged checkpoint, once."""
    model = bundle.model
    edit = random_edit([s.name for s in family.writer_sites()])
    inputs = family.with_canvas(family.chat_batch(bundle.tokenizer, PROMPTS))
    original = run(model, inputs).logits
    with edit.merged(model):
        expected = run(model, inputs).logits
    adapter_dir = export_peft_adapter(edit, model, tmp_path / "adapter")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    for i in range(LAYERS):
        for half in (DEC, ENC):
            assert {f"{half}.{i}.self_attn.o_proj", f"{half}.{i}.mlp.down_proj"} <= set(config["target_modules"])
            assert f"{half}.{i}.experts.down_proj" in config["target_parameters"]
    assert config["task_type"] is None

    peft = load_peft_adapter(copy.deepcopy(model), adapter_dir).eval()
    assert sum("lora_A" in n for n, _ in peft.named_parameters()) == 2 * len(edit.sites)  # a pair per half
    assert torch.allclose(run(peft, inputs).logits, expected, atol=1e-5)
    assert torch.equal(run(model, inputs).logits, original)  # the loaded model is untouched

    site = f"{DEC}.0.self_attn.o_proj.weight"
    delta = edit.weight_deltas(model)[site]
    merged = peft.merge_and_unload()
    assert torch.allclose(merged.get_parameter(site), model.get_parameter(site) + 2 * delta, atol=1e-6)  # twice
    assert (run(merged, inputs).logits - expected).abs().max() > 1e-3

    save_merged_model(edit, model, bundle.tokenizer, tmp_path / "merged")
    reloaded = load_diffusion_gemma(pretrained=str(tmp_path / "merged"), dtype="float32", device="cpu").model
    assert torch.allclose(reloaded.get_parameter(site), model.get_parameter(site) + delta, atol=1e-6)  # once
    assert torch.allclose(run(reloaded, inputs).logits, expected, atol=1e-5)


# --- loading ----------------------------------------------------------------------------------------------------


def test_load_diffusion_gemma_from_a_local_dir(tmp_path, bundle):
    bundle.model.save_pretrained(tmp_path / "dg")
    bundle.tokenizer.save_pretrained(tmp_path / "dg")
    loaded = load_diffusion_gemma(pretrained=str(tmp_path / "dg"), dtype="float32", device="cpu",
                                  family={"kl_positions": 2})
    model = loaded.model
    assert model.get_submodule(f"{ENC}.1.experts").down_proj is model.get_submodule(f"{DEC}.1.experts").down_proj
    assert all(torch.equal(a, b) for a, b in zip(bundle.model.state_dict().values(), model.state_dict().values()))
    assert isinstance(family_for(model, **loaded.family_options), DiffusionGemmaFamily)
    with pytest.raises(FileNotFoundError, match="(?s)no config.json.*huggingface-cli download.*model.pretrained=DIR"):
        load_diffusion_gemma(pretrained=str(tmp_path / "empty"))


def test_model_diffusion_gemma_without_weights_fails_fast_without_network(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), "model=diffusion_gemma", f"hydra.run.dir={tmp_path / 'run'}",
           "logger=csv"]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {"HF_HOME": str(tmp_path / "hf"),
                                                                          "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0 and time.monotonic() - start < 60
    for needle in (DIFFUSION_GEMMA_ID, f"huggingface-cli download {DIFFUSION_GEMMA_ID}", "52 GB", "estimate",
                   "model.pretrained=DIR"):
        assert needle in result.stderr, needle


# --- what the shared changes leave as it was on other models ---------------------------------------------------------


def test_untied_writers_of_other_models_get_no_aliases_and_a_causal_export(tmp_path, tiny):
    """Aliases are told by weights: a causal model (tied embedding/LM head, but no tied writers) has none, and its
    adapter names each site once for a causal-LM PeftModel, as before."""
    from tests.conftest import tiny_moe

    sites = [s.name for s in family_for(tiny.model).writer_sites()]
    assert all(site.aliases == () for site in resolve_sites(tiny.model, sites))
    edit = ProjectionEdit(sites, orthonormalize(torch.randn(len(sites), 32, 2)), torch.ones(len(sites)))
    config = json.loads((export_peft_adapter(edit, tiny.model, tmp_path / "a") / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(sites) and config["task_type"] == "CAUSAL_LM"
    for kind, shared in (("olmoe", None), ("qwen2_moe", "mlp.shared_expert.down_proj")):
        block = family_for(tiny_moe(kind)).moe_blocks[0]
        assert (block.block, block.experts, block.writers, block.shared) == ("mlp", "mlp.experts",
                                                                            ("mlp.experts.down_proj",), shared)
