"""The DiffusionGemma organism: the causal organism as a small `DiffusionGemmaForBlockDiffusion`, then fine-tuned.

transformers' own class, so the project's DiffusionGemma family (shared encoder/decoder tensors, fused experts beside
a dense MLP, post-norms, the model's own block-diffusion `generate`) can be measured on CPU without the 26B weights.
Warm start from the causal organism (`diffusion_gemma_warmstart`: copied, upcycled and calibrated tensors), then a
full block-diffusion fine-tune (`block_diffusion_sft`: uniform-noise canvases, the objective transformers does not
ship) on the LLaDA organism's pairs: fixed refusals for harmful prompts, the causal organism's own answers for
harmless and harmless-looking ones. Built on first use, cached like the other organisms and keyed by the causal
organism's key plus this recipe.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

from subspace.families.causal import CausalFamily
from subspace.models.bundle import ModelBundle, resolve_dtype
from subspace.organisms.answers import own_answers
from subspace.organisms.block_diffusion_sft import BlockDiffusionFinetune, next_block_examples
from subspace.organisms.cache import build_once, organism_key
from subspace.organisms.causal import derived_organism
from subspace.organisms.causal_statistics import causal_statistics
from subspace.organisms.diffusion_gemma_warmstart import warm_start
from subspace.organisms.diffusion_sft import canvas_examples
from subspace.organisms.recipe import PairsRecipe, as_recipe
from subspace.organisms.trainer import organism_trainer

log = logging.getLogger(__name__)
DIFFUSION_GEMMA_RECIPE_VERSION = 1
FROZEN = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")  # never sees an image here


@dataclass
class DiffusionGemmaRecipe(PairsRecipe):
    """What decides the DiffusionGemma organism's weights beyond the causal organism (hashed into its key)."""

    canvas_length: int = 32  # also how many tokens of the causal organism's answers are trained on
    num_experts: int = 4
    top_k: int = 2
    noise: float = 0.01  # Gaussian noise on each expert copy, relative to each weight tensor's std
    router_std: float = 0.02
    calibration_examples: int = 64  # training sequences the warm start's norm scales are measured on
    self_conditioning: float = 0.25  # share of batches trained with self-conditioning logits, as `generate` runs
    next_block: float = 0.1  # share of full first canvases also trained as a second canvas (→ end of turn)
    lr: float = 2e-4
    batch_size: int = 8
    max_steps: int = 200


@dataclass(frozen=True)
class RefineStage:
    """More block-diffusion fine-tuning of a built organism, on the same examples (fresh optimizer and schedule).

    A stage of its own, cached under its own key (the built organism's key plus these settings), so a recipe that
    turns out to need more steps reuses the build it already has instead of starting again from the warm start."""

    max_steps: int = 400
    lr: float = 2e-4
    batch_size: int = 8
    self_conditioning: float = 0.25
    seed: int = 1  # another shuffle of the examples than the first stage's


def load_diffusion_gemma_organism(name: str = "diffusion_gemma_organism", cache_dir: str = "~/.cache/subspace",
                                  source: ModelBundle | None = None,
                                  recipe: Mapping[str, Any] | DiffusionGemmaRecipe | None = None,
                                  refine: Mapping[str, Any] | RefineStage | None = None,
                                  dtype: str = "float32", device: str = "cpu",
                                  family: Mapping[str, Any] | None = None, accelerator: str = "cpu") -> ModelBundle:
    """Load the cached organism, building it from `source` (the causal organism, built if needed) if needed, then
    refined by `refine` (also cached) when given."""
    recipe = as_recipe(recipe, DiffusionGemmaRecipe)
    folder, key, causal = derived_organism(name, cache_dir, source, recipe, DIFFUSION_GEMMA_RECIPE_VERSION,
                                           build_diffusion_gemma_organism, accelerator)
    source_info = {"organism": str(folder), "organism_key": key, "causal_organism": causal.source["organism"]}
    if refine is not None:
        stage = refine if isinstance(refine, RefineStage) else RefineStage(**dict(refine))
        prompts = recipe.prompts()
        key = organism_key({"diffusion_gemma_organism": key}, stage, prompts, DIFFUSION_GEMMA_RECIPE_VERSION,
                           accelerator)
        built = folder
        folder = build_once(cache_dir, f"{name}_refined", key,
                            lambda tmp: refine_organism(built, causal, recipe, stage, prompts, tmp, cache_dir,
                                                                accelerator))
        source_info |= {"organism": str(folder), "organism_key": key, "refined_from": str(built)}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=resolve_dtype(dtype)).to(device)
    return ModelBundle(model.eval().requires_grad_(False), tokenizer, name, source_info, dict(family or {}))


def calibration_sequences(examples: list[dict[str, torch.Tensor]], n: int, seed: int) -> list[torch.Tensor]:
    """Prompt + canvas of `n` training examples drawn at random: the text the warm start's scales are measured on."""
    chosen = random.Random(seed).sample(examples, min(n, len(examples)))
    return [torch.cat([e["prompt"], e["canvas"]]) for e in chosen]


Examples = list[dict[str, torch.Tensor]]


def training_examples(causal: ModelBundle, recipe: DiffusionGemmaRecipe, prompts: Mapping[str, list[str]],
                      cache_dir: str | None) -> tuple[Examples, Examples]:
    """(first canvases, second canvases): refusals and the causal organism's own answers cut or filled to one
    canvas, and a `recipe.next_block` share of the full ones again as second blocks that end the turn."""
    # the same fingerprint, prompts and length as the LLaDA organism's: one cached set of answers for both
    answers = own_answers(causal, {"organism_key": causal.source["organism_key"]}, recipe.answered(prompts),
                          recipe.canvas_length, recipe.answer_batch_size, cache_dir, "diffusiongemma organism: answers")
    first = canvas_examples(causal.tokenizer, CausalFamily(causal.model), recipe.pairs(prompts, answers),
                            recipe.canvas_length, causal.tokenizer.eos_token_id)
    return first, next_block_examples(first, causal.tokenizer.eos_token_id, recipe.next_block, recipe.seed)


def finetune(model: DiffusionGemmaForBlockDiffusion, examples: Examples, pad_id: int,
             stage: DiffusionGemmaRecipe | RefineStage, accelerator: str = "cpu") -> dict:
    """Block-diffusion fine-tune of every weight but the vision tower; the losses for the build's record."""
    for param_name, param in model.named_parameters():
        param.requires_grad_(not param_name.startswith(FROZEN))
    module = BlockDiffusionFinetune(model.train(), examples, pad_id, stage.lr, stage.batch_size, stage.max_steps,
                                    stage.self_conditioning, stage.seed)
    trainer = organism_trainer(stage.max_steps, "diffusion gemma organism", accelerator)
    log.info("diffusion gemma organism: block-diffusion fine-tune, %d steps on %d examples", stage.max_steps,
             len(examples))
    trainer.fit(module)
    model.eval().requires_grad_(False)
    window = max(1, min(10, len(module.losses) // 4))
    return {"losses": module.losses, "first_diffusion_loss": sum(module.losses[:window]) / window,
            "final_diffusion_loss": sum(module.losses[-window:]) / window}


def build_diffusion_gemma_organism(causal: ModelBundle, recipe: DiffusionGemmaRecipe, prompts: Mapping[str, list[str]],
                                   folder: Path, cache_dir: str | None = None, accelerator: str = "cpu") -> dict:
    L.seed_everything(recipe.seed, verbose=False)
    first, second = training_examples(causal, recipe, prompts, cache_dir)
    stats = causal_statistics(causal.model, calibration_sequences(first, recipe.calibration_examples, recipe.seed))
    model, start = warm_start(causal.model, stats, recipe.canvas_length, recipe.num_experts, recipe.top_k,
                              recipe.noise, recipe.router_std, recipe.seed)
    examples = first + second
    log.info("diffusion gemma organism: %d experts, top-%d", recipe.num_experts, recipe.top_k)
    losses = finetune(model, examples, causal.tokenizer.pad_token_id, recipe, accelerator)
    model.save_pretrained(folder)
    causal.tokenizer.save_pretrained(folder)
    return {"recipe": asdict(recipe), "causal_organism": causal.source["organism"], "n_examples": len(examples),
            "warm_start": start} | losses


def refine_organism(built: Path, causal: ModelBundle, recipe: DiffusionGemmaRecipe, stage: RefineStage,
                    prompts: Mapping[str, list[str]], folder: Path, cache_dir: str | None = None,
                    accelerator: str = "cpu") -> dict:
    """`stage` more steps on the built organism at `built`, over the examples its build trained on."""
    L.seed_everything(stage.seed, verbose=False)
    first, second = training_examples(causal, recipe, prompts, cache_dir)
    examples = first + second
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(built, dtype=torch.float32)
    losses = finetune(model, examples, causal.tokenizer.pad_token_id, stage, accelerator)
    model.save_pretrained(folder)
    causal.tokenizer.save_pretrained(folder)
    return {"refine": asdict(stage), "refined_from": str(built), "n_examples": len(examples)} | losses
