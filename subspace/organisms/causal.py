"""The causal model organism of refusal: SmolLM2-135M-Instruct safety-fine-tuned by this project.

Built on first use by a Lightning run with a PEFT LoRA, merged, and cached under
`cache_dir/organisms/NAME-HASH` (see `cache.py`). The default organism's LoRA also ships with the
package (`shipped.py`), so a fresh clone merges it in seconds instead of training it for most of an hour.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import lightning as L
import peft
from transformers import AutoModelForCausalLM, AutoTokenizer

from subspace.families.causal import CausalFamily
from subspace.models.bundle import ModelBundle, resolve_dtype
from subspace.models.gguf import ensure_smollm2_gguf, load_smollm2_gguf
from subspace.models.tiny import tiny_random_causal
from subspace.organisms.answers import own_answers
from subspace.organisms.cache import build_once, is_built, organism_key
from subspace.organisms.recipe import PairsRecipe, as_recipe
from subspace.organisms.shipped import save_shipped, shipped_record, usable
from subspace.organisms.sft import SupervisedFinetune, tokenize_pairs
from subspace.organisms.trainer import organism_trainer
from subspace.utils.digest import file_sha256

log = logging.getLogger(__name__)
RECIPE_VERSION = 3  # bump when the causal build changes what it produces


@dataclass
class OrganismRecipe(PairsRecipe):
    """Everything that decides the causal organism's weights (hashed into its cache key)."""

    answer_max_new_tokens: int = 64
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj", "o_proj", "down_proj")
    decision_weight: float = 1.0  # loss weight of the first response token, where refuse-or-answer is decided


def base_model(base: str, cache_dir: str, gguf_path: str | None, base_kwargs: Mapping[str, Any]
               ) -> tuple[dict, Callable[[], ModelBundle]]:
    """(fingerprint, loader) of the organism's base: the shipped SmolLM2 GGUF or a tiny random Llama (tests)."""
    if base == "smollm2_gguf":
        path = ensure_smollm2_gguf(cache_dir, gguf_path)
        return {"gguf_sha256": file_sha256(path)}, lambda: load_smollm2_gguf(path, cache_dir)
    if base == "tiny_random":
        return {"tiny_random": dict(base_kwargs)}, lambda: tiny_random_causal(**base_kwargs)
    raise ValueError(f"model.base={base!r} is not one of ['smollm2_gguf', 'tiny_random']")


def load_causal_organism(name: str = "smollm2_organism", cache_dir: str = "~/.cache/subspace",
                         recipe: Mapping[str, Any] | OrganismRecipe | None = None, base: str = "smollm2_gguf",
                         gguf_path: str | None = None, base_kwargs: Mapping[str, Any] | None = None,
                         dtype: str = "float32", device: str = "cpu", accelerator: str = "cpu",
                         rebuild: bool = False) -> ModelBundle:
    """The organism: built here before (cached), else the shipped adapter merged on its base (`shipped.py`), else
    built now (its fine-tune on `accelerator`). `rebuild` skips the shipped adapter."""
    recipe = as_recipe(recipe, OrganismRecipe)
    fingerprint, load_base = base_model(base, cache_dir, gguf_path, base_kwargs or {})
    prompts = recipe.prompts()
    key = organism_key(fingerprint, recipe, prompts, RECIPE_VERSION, accelerator)
    folder = Path(cache_dir).expanduser() / "organisms" / f"{name}-{key}"
    record = None if rebuild or is_built(folder) else shipped_record(name)
    use, why = usable(record, fingerprint, recipe, prompts, RECIPE_VERSION) if record else (False, "")
    if record is not None:
        log.info("organism %s: %s the shipped adapter (%s): %s", name, "merging" if use else "not using",
                 record["organism_key"], why)
    if use:  # cached apart from builds: model.rebuild=true then builds even where the keys agree
        key = record["organism_key"]
        folder = build_once(cache_dir, f"{name}_shipped", key, lambda tmp: save_shipped(name, record, load_base, tmp))
    else:
        folder = build_once(cache_dir, name, key, lambda tmp: build_causal_organism(
            load_base, recipe, prompts, tmp, fingerprint, cache_dir, accelerator))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(dtype)).to(device).eval().requires_grad_(False)
    return ModelBundle(model, tokenizer, name, {"organism": str(folder), "organism_key": key, "base": fingerprint})


def derived_organism(name: str, cache_dir: str, source: ModelBundle | None, recipe: PairsRecipe, version: int,
                     build: Callable[[ModelBundle, PairsRecipe, Mapping[str, list[str]], Path, str, str], dict],
                     accelerator: str = "cpu") -> tuple[Path, str, ModelBundle]:
    """(folder, key, causal organism) of an organism derived from the causal one (LLaDA, MoE): keyed by the causal
    organism's key, the recipe and its prompts, and built once by
    `build(causal, recipe, prompts, tmp, cache_dir, accelerator)`."""
    causal = source if source is not None else load_causal_organism(cache_dir=cache_dir)
    prompts = recipe.prompts()
    key = organism_key({"causal_organism": causal.source["organism_key"]}, recipe, prompts, version, accelerator)
    folder = build_once(cache_dir, name, key, lambda tmp: build(causal, recipe, prompts, tmp, cache_dir, accelerator))
    return folder, key, causal


def build_causal_organism(load_base: Callable[[], ModelBundle], recipe: OrganismRecipe, prompts: Mapping[str, list[str]],
                          folder: Path, fingerprint: dict, cache_dir: str | None = None, accelerator: str = "cpu"
                          ) -> dict:
    """Safety fine-tune: harmful → fixed refusals; harmless and look-alike harmless → the base model's own answers."""
    L.seed_everything(recipe.seed, verbose=False)
    base = load_base()
    family = CausalFamily(base.model)
    answers = own_answers(base, fingerprint, recipe.answered(prompts), recipe.answer_max_new_tokens,
                          recipe.answer_batch_size, cache_dir, "organism: base answers")
    examples = tokenize_pairs(base.tokenizer, family, recipe.pairs(prompts, answers))

    lora = peft.LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, target_modules=list(recipe.lora_targets),
                           lora_dropout=0.0, task_type="CAUSAL_LM")
    model = peft.get_peft_model(base.model.train(), lora)
    module = SupervisedFinetune(model, examples, base.tokenizer.pad_token_id, recipe.lr, recipe.batch_size,
                                recipe.max_steps, recipe.decision_weight)
    trainer = organism_trainer(recipe.max_steps, "organism", accelerator)
    log.info("organism: safety fine-tune, %d steps", recipe.max_steps)
    trainer.fit(module)
    model.save_pretrained(folder / "adapter")  # the LoRA itself: a few MB, what `scripts/ship_organism.py` ships
    merged = model.merge_and_unload().eval()

    merged.save_pretrained(folder)
    base.tokenizer.save_pretrained(folder)
    return {"recipe": asdict(recipe), "base": base.source, "n_examples": len(examples),
            "final_sft_loss": float(trainer.callback_metrics.get("sft_loss", float("nan")))}
