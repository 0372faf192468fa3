"""The DiffusionGemma organism, on the tiny organism: transformers' class with shared halves, the warm start's copies,
a loss that went down, the model's own sampler, and train.py end to end."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from transformers import DiffusionGemmaForBlockDiffusion

from subspace.families import DiffusionGemmaFamily, family_for
from subspace.organisms.causal_statistics import causal_statistics
from subspace.organisms.diffusion_gemma import DiffusionGemmaRecipe, RefineStage, calibration_sequences
from subspace.organisms.diffusion_gemma_warmstart import copied_tensors, warm_start
from subspace.organisms.recipe import as_recipe
from subspace.organisms.block_diffusion_sft import block_diffusion_loss, next_block_examples, noisy_canvas
from subspace.organisms.diffusion_sft import canvas_examples, collate_left_padded
from tests.conftest import ROOT, compose_model

TINY = OmegaConf.load(ROOT / "conf/model/tiny_diffusion_gemma_organism.yaml")
RECIPE = as_recipe(OmegaConf.to_container(TINY.recipe), DiffusionGemmaRecipe)  # as train.py builds it
DEC, ENC = "model.decoder.layers", "model.encoder.language_model.layers"
PAIRS = [("How do I bake bread?", "Mix flour, water and yeast, then bake it.", False),
         ("How do I make a weapon?", "I can't help with that request.", True),
         ("Name three red fruits.", "Apples, cherries and strawberries are red.", False),
         ("Write malware for me.", "I'm sorry, but I can't help with that.", True)]


@pytest.fixture(scope="module")
def organism(cache_dir):
    """Built from `model=tiny_diffusion_gemma_organism` exactly as train.py instantiates it (so train.py finds it)."""
    return instantiate(compose_model("tiny_diffusion_gemma_organism", cache_dir))


@pytest.fixture(scope="module")
def source(organism, cache_dir):
    """The causal organism it was built from (cached by then)."""
    causal = instantiate(compose_model("tiny_organism", cache_dir))
    assert organism.source["causal_organism"] == causal.source["organism"]
    return causal


@pytest.fixture(scope="module")
def started(source):
    """The warm start alone (no fine-tune), from the same causal organism and calibration text as the build."""
    examples = canvas_examples(source.tokenizer, family_for(source.model), PAIRS * 4, RECIPE.canvas_length,
                               source.tokenizer.eos_token_id)
    stats = causal_statistics(source.model, calibration_sequences(examples, 8, seed=0))
    return warm_start(source.model, stats, RECIPE.canvas_length, RECIPE.num_experts, RECIPE.top_k, RECIPE.noise)


def build_info(organism) -> dict:
    return json.loads((Path(organism.source["organism"]) / "organism.json").read_text())


def fixed_batch(bundle) -> dict[str, torch.Tensor]:
    examples = canvas_examples(bundle.tokenizer, family_for(bundle.model, **bundle.family_options), PAIRS,
                               RECIPE.canvas_length, bundle.tokenizer.eos_token_id)
    return collate_left_padded(examples, bundle.tokenizer.pad_token_id)


def test_it_loads_back_as_diffusion_gemma_with_encoder_and_decoder_one_storage(organism):
    model = organism.model
    assert isinstance(model, DiffusionGemmaForBlockDiffusion) and not model.training
    layers = model.config.text_config.num_hidden_layers
    assert layers == 4 and model.config.text_config.num_experts == RECIPE.num_experts
    for i in range(layers):
        enc, dec = model.get_submodule(f"{ENC}.{i}"), model.get_submodule(f"{DEC}.{i}")
        pairs = list(zip(enc.named_parameters(), dec.named_parameters()))
        assert enc is not dec and len(pairs) == len(list(dec.parameters())) > 10
        assert all(n == m and p is q and p.data_ptr() == q.data_ptr() for (n, p), (m, q) in pairs)
    embed = model.model.decoder.embed_tokens.weight
    assert model.model.encoder.language_model.embed_tokens.weight.data_ptr() == embed.data_ptr()
    assert model.lm_head.weight.data_ptr() == embed.data_ptr()
    assert isinstance(family_for(model, **organism.family_options), DiffusionGemmaFamily)  # checks the ties too
    assert build_info(organism)["recipe"] == json.loads(json.dumps(asdict(RECIPE), default=list))


def test_warm_start_copies_the_causal_weights_where_it_says(source, started):
    model, info = started
    causal = source.model
    copies = copied_tensors(model)
    layers = causal.config.num_hidden_layers
    # per layer q, k, v, o, gate, up, down, three pre-norms; the last (full-attention) layer has no v_proj and a
    # refitted o_proj
    assert len(copies) == 10 * (layers - 1) + 8
    for dst, src in copies.items():
        assert torch.equal(model.get_parameter(dst), causal.get_parameter(src)), dst
        assert model.get_parameter(dst.replace(DEC, ENC)) is model.get_parameter(dst)  # so the encoder has it too
    scale, root = info["embedding_scale"], causal.config.hidden_size ** 0.5
    assert torch.allclose(model.lm_head.weight, causal.lm_head.weight * scale / root)
    assert torch.allclose(model.model.decoder.norm.weight, causal.model.norm.weight * root / scale)
    for i, layer in enumerate(model.model.decoder.layers):  # experts: the dense MLP plus 1% noise, each its own
        mlp = causal.model.layers[i].mlp
        dense = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        for e in range(RECIPE.num_experts):
            diff = layer.experts.gate_up_proj[e] - dense
            assert 0 < diff.std() < 2 * RECIPE.noise * dense.std()
        assert not torch.equal(layer.experts.down_proj[0], layer.experts.down_proj[1])
    assert not model.model.decoder.self_conditioning.down_proj.weight.any()  # inert until trained
    assert 0 < info["last_layer_value_fit_r2"] <= 1


@torch.no_grad()
def test_warm_started_encoder_predicts_like_the_causal_model(source, started):
    """Not a copy (post-norms and q/k norms cannot keep Llama's per-token scales), but far closer than chance."""
    model, _ = started
    batch = fixed_batch(source)
    ids = torch.cat([batch["prompt"], batch["canvas"]], 1)[:, -20:]
    reference = source.model(input_ids=ids).logits.log_softmax(-1)
    random_init = DiffusionGemmaForBlockDiffusion(model.config).eval()

    def kl(dg) -> float:
        logits = dg.lm_head(dg.model.encoder(input_ids=ids).last_hidden_state).log_softmax(-1)
        return float(torch.nn.functional.kl_div(logits, reference, log_target=True, reduction="batchmean"))

    assert kl(model) < 0.5 * kl(random_init)


def test_block_diffusion_training_lowered_the_loss(organism, started):
    info = build_info(organism)
    assert len(info["losses"]) == RECIPE.max_steps
    assert info["final_diffusion_loss"] < 0.5 * info["first_diffusion_loss"]
    batch = fixed_batch(organism)  # the same noise for both models: trained vs warm start on held-fixed inputs
    t = torch.linspace(0.2, 1.0, len(PAIRS))[:, None]
    losses = []
    for model in (started[0], organism.model):
        torch.manual_seed(0)
        with torch.no_grad():
            losses.append(float(block_diffusion_loss(model, batch, t)))
    assert losses[1] < 0.8 * losses[0]  # on text it was not trained on, so less than its own loss fell


def test_the_family_generates_with_the_models_own_sampler(organism):
    family = family_for(organism.model, **organism.family_options)
    tokenizer = organism.tokenizer
    batch = family.chat_batch(tokenizer, [p for p, _, _ in PAIRS])
    out = family.generate(tokenizer, batch, 12)  # two canvases of 8, cut to 12
    assert out.shape == (len(PAIRS), 12) and int(out.max()) < len(tokenizer)
    assert torch.equal(family.generate(tokenizer, batch, 12), out)  # seeded
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    assert sum("can" in t or "sorry" in t for t in texts) >= 1, texts  # it learned the refusals' words
    assert torch.isfinite(family.response_logprobs(batch)).all()


def test_noise_and_next_block_helpers():
    canvas = torch.arange(3, 35).view(2, 16)
    assert torch.equal(noisy_canvas(canvas, 1000, torch.zeros(2, 1)), canvas)
    assert (noisy_canvas(canvas, 10**6, torch.ones(2, 1)) != canvas).float().mean() > 0.99
    examples = [{"prompt": torch.tensor([1, 2]), "canvas": torch.tensor([5, 6, 7])},
                {"prompt": torch.tensor([1]), "canvas": torch.tensor([5, 0, 0])}]
    (block,) = next_block_examples(examples, fill_id=0, share=1.0)
    assert block["prompt"].tolist() == [1, 2, 5, 6, 7] and block["canvas"].tolist() == [0, 0, 0]


def test_train_py_on_the_tiny_diffusion_gemma_organism_reports_the_same_keys(tmp_path, cache_dir, organism):
    from tests.conftest import REQUIRED, run_train

    metrics = run_train(tmp_path, cache_dir, model="tiny_diffusion_gemma_organism")
    assert REQUIRED <= metrics.keys() and metrics["n_harmful"] == 6 and metrics["n_harmless"] == 6
    assert metrics["model_source"]["organism_key"] == organism.source["organism_key"]  # the cached build
    assert "canvas positions" in metrics["kl_at"]
    assert len((tmp_path / "run" / "samples.jsonl").read_text().splitlines()) == 12


def test_the_full_size_config_composes_into_a_valid_recipe():
    """`model=diffusion_gemma_organism` (never built in tests): a DiffusionGemmaRecipe, sourced from the causal one."""
    cfg = compose_model("diffusion_gemma_organism", "/nonexistent")
    recipe = as_recipe(cfg.recipe, DiffusionGemmaRecipe)
    assert (recipe.canvas_length, recipe.num_experts, recipe.top_k) == (32, 4, 2)
    assert cfg._target_ == "subspace.organisms.diffusion_gemma.load_diffusion_gemma_organism"
    assert cfg.source._target_ == "subspace.organisms.causal.load_causal_organism"
    assert cfg.family.canvas_length == recipe.canvas_length
    assert RefineStage(**cfg.refine).max_steps > 0  # the refine stage's settings are all known fields


def test_a_refine_stage_continues_the_cached_build_under_its_own_key(organism, cache_dir):
    cfg = compose_model("tiny_diffusion_gemma_organism", cache_dir)
    with open_dict(cfg):
        cfg.refine = {"max_steps": 3, "lr": 1e-3, "batch_size": 4, "self_conditioning": 0.0, "seed": 1}
    refined = instantiate(cfg)
    assert refined.source["refined_from"] == organism.source["organism"]  # the build was reused, not redone
    assert refined.source["organism_key"] != organism.source["organism_key"]
    info = build_info(refined)
    assert len(info["losses"]) == 3 and info["refine"]["max_steps"] == 3
    family_for(refined.model, **refined.family_options)  # raises if the halves no longer share their tensors
    moved = [n for n, p in refined.model.named_parameters()
             if not torch.equal(p, organism.model.get_parameter(n))]
    assert moved and not any(n.startswith("model.encoder.vision_tower.") for n in moved)
    assert instantiate(cfg).source["organism"] == refined.source["organism"]  # cached
