"""The MoE organism: the causal organism sparse-upcycled into a Mixtral mixture of experts, then fine-tuned.

Every layer's MLP becomes `num_experts` noisy copies behind a small random top-k router (`upcycle_llama`), so the
model starts as the causal organism. A full fine-tune of the experts and routers (attention, norms and
embeddings frozen: they already carry the organism's behaviour) on the causal organism's own training pairs,
fixed refusals for harmful prompts and the causal organism's own answers for harmless and harmless-looking ones,
is at once the safety fine-tune and what makes the experts differ; the load-balancing loss keeps the router from
sending every token to the same experts. Built on first use, cached like the causal organism and keyed by its key
plus this recipe.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import lightning as L
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM

from subspace.families.causal import CausalFamily
from subspace.models.bundle import ModelBundle, resolve_dtype
from subspace.organisms.answers import own_answers
from subspace.organisms.causal import derived_organism
from subspace.organisms.recipe import PairsRecipe, as_recipe
from subspace.organisms.upcycle import upcycle_llama
from subspace.organisms.sft import SupervisedFinetune, tokenize_pairs
from subspace.organisms.trainer import organism_trainer

log = logging.getLogger(__name__)
MOE_RECIPE_VERSION = 1
TRAINED = (".mlp.experts.", ".mlp.gate.")  # the experts and the routers; everything else stays the causal organism's


@dataclass
class MoERecipe(PairsRecipe):
    """Everything that decides the MoE organism's weights beyond the causal organism (hashed into its key)."""

    num_experts: int = 4
    top_k: int = 2
    noise: float = 0.01  # Gaussian noise on each expert copy, relative to each weight tensor's std
    router_std: float = 0.02  # the routers' initial weights
    aux_loss_coef: float = 0.01  # weight of the load-balancing loss (mean over MoE layers; top_k when balanced)
    answer_max_new_tokens: int = 32
    decision_weight: float = 4.0  # as the causal recipe: the refuse-or-answer token counts this many times
    lr: float = 1e-4
    batch_size: int = 8
    max_steps: int = 300


def load_moe_organism(name: str = "moe_organism", cache_dir: str = "~/.cache/subspace",
                      source: ModelBundle | None = None, recipe: Mapping[str, Any] | MoERecipe | None = None,
                      dtype: str = "float32", device: str = "cpu", accelerator: str = "cpu") -> ModelBundle:
    """Load the cached MoE organism, building it from `source` (the causal organism, built if needed) if needed."""
    recipe = as_recipe(recipe, MoERecipe)
    folder, key, causal = derived_organism(name, cache_dir, source, recipe, MOE_RECIPE_VERSION, build_moe_organism,
                                           accelerator)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(dtype)).to(device)
    return ModelBundle(model.eval().requires_grad_(False), tokenizer, name,
                       {"organism": str(folder), "organism_key": key, "causal_organism": causal.source["organism"]})


def upcycled_organism(causal: ModelBundle, recipe: MoERecipe) -> MixtralForCausalLM:
    """The causal organism as an untrained Mixtral (noisy expert copies, random routers), in float32."""
    return upcycle_llama(causal.model, recipe.num_experts, recipe.top_k, recipe.noise, recipe.router_std,
                         recipe.aux_loss_coef, seed=recipe.seed)  # the saved config records the weight trained with


def build_moe_organism(causal: ModelBundle, recipe: MoERecipe, prompts: Mapping[str, list[str]], folder: Path,
                       cache_dir: str | None = None, accelerator: str = "cpu") -> dict:
    L.seed_everything(recipe.seed, verbose=False)
    answers = own_answers(causal, {"organism_key": causal.source["organism_key"]}, recipe.answered(prompts),
                          recipe.answer_max_new_tokens, recipe.answer_batch_size, cache_dir, "moe organism: answers")
    model = upcycled_organism(causal, recipe).train()
    for param_name, param in model.named_parameters():
        param.requires_grad_(any(part in param_name for part in TRAINED))
    examples = tokenize_pairs(causal.tokenizer, CausalFamily(model), recipe.pairs(prompts, answers))
    module = SupervisedFinetune(model, examples, causal.tokenizer.pad_token_id, recipe.lr, recipe.batch_size,
                                recipe.max_steps, recipe.decision_weight, recipe.aux_loss_coef)
    trainer = organism_trainer(recipe.max_steps, "moe organism", accelerator)
    log.info("moe organism: %d experts, top-%d; fine-tune of experts and routers, %d steps", recipe.num_experts,
             recipe.top_k, recipe.max_steps)
    trainer.fit(module)
    model.eval().requires_grad_(False).save_pretrained(folder)
    causal.tokenizer.save_pretrained(folder)
    metrics = trainer.callback_metrics
    return {"recipe": asdict(recipe), "causal_organism": causal.source["organism"], "n_examples": len(examples),
            "final_sft_loss": float(metrics.get("sft_loss", float("nan"))),
            "final_router_aux": float(metrics.get("router_aux", float("nan")))}
