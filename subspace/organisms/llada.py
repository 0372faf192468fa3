"""The LLaDA organism: the causal organism turned into a bidirectional masked-diffusion model.

Warm start: the causal organism's weights under LLaDA's names (`llada_from_llama`), a new mask
token, attention made bidirectional, logits shifted so the LM head stays aligned. Then a full
masked-diffusion fine-tune on prompt → canvas pairs: fixed refusals for harmful prompts, the causal
organism's own answers for harmless and harmless-looking ones. Built on first use, cached like
the causal organism and keyed by its key plus this recipe.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import lightning as L
from transformers import AutoTokenizer

from subspace.families.llada import LLaDAFamily
from subspace.models.bundle import ModelBundle, resolve_dtype
from subspace.models.llada.loading import llada_from_llama
from subspace.models.llada.modeling import LLaDAModelLM
from subspace.organisms.answers import own_answers
from subspace.organisms.causal import derived_organism
from subspace.organisms.recipe import PairsRecipe, as_recipe
from subspace.organisms.diffusion_sft import MaskedDiffusionFinetune, canvas_examples
from subspace.organisms.snapshots import Snapshots
from subspace.organisms.trainer import organism_trainer

log = logging.getLogger(__name__)
DIFFUSION_RECIPE_VERSION = 1
MASK_TOKEN = "<|mdm_mask|>"  # LLaDA's own name for it


@dataclass
class DiffusionRecipe(PairsRecipe):
    canvas_length: int = 32
    min_mask_ratio: float = 1e-3
    lr: float = 1e-4
    batch_size: int = 16
    max_steps: int = 400
    precision: str | None = None  # a Lightning precision for the fine-tune; None: 32-true (v1)


def load_llada_organism(name: str = "llada_organism", cache_dir: str = "~/.cache/subspace",
                        source: ModelBundle | None = None, recipe: Mapping[str, Any] | DiffusionRecipe | None = None,
                        dtype: str = "float32", device: str = "cpu", family: Mapping[str, Any] | None = None,
                        accelerator: str = "cpu", snapshot_every: int | None = None) -> ModelBundle:
    """Load the cached LLaDA organism, building it from `source` (the causal organism, built if needed) if needed.

    `snapshot_every`: a build also saves the model every that many steps under `snapshots/` (for
    `scripts/organism_curve.py`); it does not change the organism or its key."""
    recipe = as_recipe(recipe, DiffusionRecipe)
    build = functools.partial(build_llada_organism, snapshot_every=snapshot_every)
    folder, key, causal = derived_organism(name, cache_dir, source, recipe, DIFFUSION_RECIPE_VERSION, build,
                                           accelerator)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = LLaDAModelLM.from_pretrained(folder, dtype=resolve_dtype(dtype)).to(device).eval().requires_grad_(False)
    return ModelBundle(model, tokenizer, name, {"organism": str(folder), "organism_key": key,
                                                "causal_organism": causal.source["organism"]}, dict(family or {}))


def build_llada_organism(causal: ModelBundle, recipe: DiffusionRecipe, prompts: Mapping[str, list[str]],
                         folder: Path, cache_dir: str | None = None, accelerator: str = "cpu",
                         snapshot_every: int | None = None) -> dict:
    L.seed_everything(recipe.seed, verbose=False)
    tokenizer = copy.deepcopy(causal.tokenizer)  # gains a mask token; the causal organism's stays as it is
    answers = own_answers(causal, {"organism_key": causal.source["organism_key"]}, recipe.answered(prompts),
                          recipe.canvas_length, recipe.answer_batch_size, cache_dir, "llada organism: answers")
    tokenizer.add_special_tokens({"additional_special_tokens": [MASK_TOKEN]})
    mask_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    model = llada_from_llama(causal.model, mask_id, vocab_size=len(tokenizer), shift_logits=True).train()
    model.requires_grad_(True)
    family = LLaDAFamily(model, canvas_length=recipe.canvas_length)
    examples = canvas_examples(tokenizer, family, recipe.pairs(prompts, answers), recipe.canvas_length,
                               tokenizer.eos_token_id)
    module = MaskedDiffusionFinetune(model, examples, tokenizer.pad_token_id, mask_id, recipe.lr, recipe.batch_size,
                                     recipe.max_steps, recipe.min_mask_ratio, recipe.seed)
    snapshots = [Snapshots(folder / "snapshots", snapshot_every, tokenizer)] if snapshot_every else []
    trainer = organism_trainer(recipe.max_steps, "llada organism", accelerator, recipe.precision, snapshots)
    log.info("llada organism: masked-diffusion fine-tune, %d steps", recipe.max_steps)
    trainer.fit(module)
    model.eval().requires_grad_(False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"recipe": asdict(recipe), "causal_organism": causal.source["organism"], "n_examples": len(examples),
            "final_diffusion_loss": float(trainer.callback_metrics.get("diffusion_loss", float("nan")))}
