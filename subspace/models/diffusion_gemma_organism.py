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
from subspace.models.causal_statistics import causal_statistics
from subspace.models.diffusion_gemma_warmstart import warm_start
from subspace.models.organism import PairsRecipe, as_recipe, derived_organism, own_answers
from subspace.training.block_diffusion_sft import BlockDiffusionFinetune, next_block_examples
from subspace.training.diffusion_sft import canvas_examples

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


def load_diffusion_gemma_organism(name: str = "diffusion_gemma_organism", cache_dir: str = "~/.cache/subspace",
                                  source: ModelBundle | None = None,
                                  recipe: Mapping[str, Any] | DiffusionGemmaRecipe | None = None,
                                  dtype: str = "float32", device: str = "cpu",
                                  family: Mapping[str, Any] | None = None) -> ModelBundle:
    """Load the cached organism, building it from `source` (the causal organism, built if needed) if needed."""
    recipe = as_recipe(recipe, DiffusionGemmaRecipe)
    folder, key, causal = derived_organism(name, cache_dir, source, recipe, DIFFUSION_GEMMA_RECIPE_VERSION,
                                           build_diffusion_gemma_organism)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=resolve_dtype(dtype)).to(device)
    return ModelBundle(model.eval().requires_grad_(False), tokenizer, name,
                       {"organism": str(folder), "organism_key": key, "causal_organism": causal.source["organism"]},
                       dict(family or {}))


def calibration_sequences(examples: list[dict[str, torch.Tensor]], n: int, seed: int) -> list[torch.Tensor]:
    """Prompt + canvas of `n` training examples drawn at random: the text the warm start's scales are measured on."""
    chosen = random.Random(seed).sample(examples, min(n, len(examples)))
    return [torch.cat([e["prompt"], e["canvas"]]) for e in chosen]


def build_diffusion_gemma_organism(causal: ModelBundle, recipe: DiffusionGemmaRecipe, prompts: Mapping[str, list[str]],
                                   folder: Path, cache_dir: str | None = None) -> dict:
    L.seed_everything(recipe.seed, verbose=False)
    tokenizer = causal.tokenizer
    # the same fingerprint, prompts and length as the LLaDA organism's: one cached set of answers for both
    answers = own_answers(causal, {"organism_key": causal.source["organism_key"]}, recipe.answered(prompts),
                          recipe.canvas_length, recipe.answer_batch_size, cache_dir, "diffusiongemma organism: answers")
    examples = canvas_examples(tokenizer, CausalFamily(causal.model), recipe.pairs(prompts, answers),
                               recipe.canvas_length, tokenizer.eos_token_id)
    stats = causal_statistics(causal.model, calibration_sequences(examples, recipe.calibration_examples, recipe.seed))
    model, start = warm_start(causal.model, stats, recipe.canvas_length, recipe.num_experts, recipe.top_k,
                              recipe.noise, recipe.router_std, recipe.seed)
    examples += next_block_examples(examples, tokenizer.eos_token_id, recipe.next_block, recipe.seed)
    for param_name, param in model.named_parameters():
        param.requires_grad_(not param_name.startswith(FROZEN))
    module = BlockDiffusionFinetune(model.train(), examples, tokenizer.pad_token_id, recipe.lr, recipe.batch_size,
                                    recipe.max_steps, recipe.self_conditioning, recipe.seed)
    trainer = L.Trainer(max_steps=recipe.max_steps, accelerator="cpu", max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, deterministic=True)
    log.info("diffusion gemma organism: %d experts, top-%d; block-diffusion fine-tune, %d steps on %d examples",
             recipe.num_experts, recipe.top_k, recipe.max_steps, len(examples))
    trainer.fit(module)
    model.eval().requires_grad_(False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    window = max(1, min(10, len(module.losses) // 4))
    return {"recipe": asdict(recipe), "causal_organism": causal.source["organism"], "n_examples": len(examples),
            "warm_start": start, "losses": module.losses,
            "first_diffusion_loss": sum(module.losses[:window]) / window,
            "final_diffusion_loss": sum(module.losses[-window:]) / window}
