"""The causal model organism of refusal: SmolLM2-135M-Instruct safety-fine-tuned by this project.

Built on first use by a Lightning run with a PEFT LoRA, merged, and cached under
`cache_dir/organisms/NAME-HASH`, where HASH covers everything the weights depend on (base
file, prompts, recipe, library versions). A file lock keeps two processes from building it at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import lightning as L
import peft
import torch
import transformers
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from subspace.data.loading import load_prompts
from subspace.evaluation.generation import generate_responses
from subspace.families.causal import CausalFamily
from subspace.models.bundle import ModelBundle, resolve_dtype
from subspace.models.gguf import ensure_smollm2_gguf, load_smollm2_gguf
from subspace.models.tiny import tiny_random_causal
from subspace.training.sft import SupervisedFinetune, tokenize_pairs
from subspace.utils.io import atomic_dir, write_json
from subspace.training.progress import organism_trainer

log = logging.getLogger(__name__)
Sources = Union[str, Mapping[str, Any], Sequence[Union[str, Mapping[str, Any]]]]
RECIPE_VERSION = 3  # bump when the build code changes what it produces

DEFAULT_REFUSALS = (
    "I'm sorry, but I can't help with that. It could cause real harm to people.",
    "I can't help with that request. It is harmful, and it may be illegal.",
    "I'm sorry, I won't provide that. If you have a different question, I'm happy to help.",
    "I cannot assist with this, because it could be used to hurt someone.",
)


@dataclass
class PairsRecipe:
    """The organism's training pairs: harmful → fixed refusals, harmless and look-alike → a model's own answers."""

    harmful: Sources = ("builtin:harmful_train",)
    harmless: Sources = ("builtin:harmless_train",)
    lookalike: Sources = ("builtin:lookalike_train",)  # harmless requests that look harmful, answered for real
    lookalike_repeat: int = 1  # how often each look-alike example is seen per epoch (teaches intent, not phrasing)
    refusals: tuple[str, ...] = DEFAULT_REFUSALS
    answer_batch_size: int = 32
    lr: float = 5e-4
    batch_size: int = 8
    max_steps: int = 150
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def prompts(self) -> dict[str, list[str]]:
        return {k: load_sources(getattr(self, k), f"organism {k}") for k in ("harmful", "harmless", "lookalike")}

    def answered(self, prompts: Mapping[str, list[str]]) -> list[str]:
        return prompts["harmless"] + prompts["lookalike"]

    def pairs(self, prompts: Mapping[str, list[str]], answers: Sequence[str]) -> list[tuple[str, str, bool]]:
        """(prompt, response, finished) with refusals cycling through `refusals` and look-alikes repeated."""
        refusals = [(p, self.refusals[i % len(self.refusals)], True) for i, p in enumerate(prompts["harmful"])]
        answered = [(p, a, False) for p, a in zip(self.answered(prompts), answers)]
        return refusals + answered + answered[len(prompts["harmless"]):] * (self.lookalike_repeat - 1)


@dataclass
class OrganismRecipe(PairsRecipe):
    """Everything that decides the causal organism's weights (hashed into its cache key)."""

    answer_max_new_tokens: int = 64
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj", "o_proj", "down_proj")
    decision_weight: float = 1.0  # loss weight of the first response token, where refuse-or-answer is decided


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def organism_key(base: dict, recipe: PairsRecipe, prompts: Mapping[str, list[str]],
                 version: int = RECIPE_VERSION) -> str:
    blob = json.dumps({
        "base": base, "recipe": asdict(recipe), "version": version, "prompts": prompts,
        "libs": {m.__name__: m.__version__ for m in (torch, transformers, peft, L)},
    }, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def as_recipe(recipe: Mapping[str, Any] | PairsRecipe | None, cls: type[PairsRecipe] | None = None) -> PairsRecipe:
    """A recipe dataclass from a config mapping (lists become tuples so the recipe hashes stably)."""
    cls = cls or OrganismRecipe
    if isinstance(recipe, cls):
        return recipe
    values = OmegaConf.to_container(recipe, resolve=True) if isinstance(recipe, DictConfig) else dict(recipe or {})
    for key in ("refusals", "lora_targets"):
        if key in values:
            values[key] = tuple(values[key])
    return cls(**values)


def build_once(cache_dir: str, name: str, key: str, build: Callable[[Path], dict]) -> Path:
    """`cache_dir/organisms/NAME-KEY`, built by `build(tmp_dir) -> info` under a file lock if it is not there yet.

    The build writes into a temporary sibling that is renamed into place only when it succeeds, so
    an interrupted build leaves nothing that looks finished.
    """
    folder = Path(cache_dir).expanduser() / "organisms" / f"{name}-{key}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "organism.json").exists():
            start = time.time()
            with atomic_dir(folder) as tmp:
                info = build(tmp)
                info["build_seconds"] = round(time.time() - start, 1)
                (tmp / "organism.json").write_text(json.dumps(info, indent=2, default=list))
    return folder


def load_sources(sources: Sources, name: str) -> list[str]:
    """Concatenate one or more prompt sources, dropping prompts already seen."""
    if isinstance(sources, (str, Mapping)):
        sources = [sources]
    seen: dict[str, None] = {}
    for source in sources:
        seen.update(dict.fromkeys(load_prompts(dict(source) if isinstance(source, Mapping) else source, name=name)))
    return list(seen)


def base_model(base: str, cache_dir: str, gguf_path: str | None, base_kwargs: Mapping[str, Any]
               ) -> tuple[dict, Callable[[], ModelBundle]]:
    """(fingerprint, loader) of the organism's base: the shipped SmolLM2 GGUF or a tiny random Llama (tests)."""
    if base == "smollm2_gguf":
        path = ensure_smollm2_gguf(cache_dir, gguf_path)
        return {"gguf_sha256": _sha256(path)}, lambda: load_smollm2_gguf(path)
    if base == "tiny_random":
        return {"tiny_random": dict(base_kwargs)}, lambda: tiny_random_causal(**base_kwargs)
    raise ValueError(f"model.base={base!r} is not one of ['smollm2_gguf', 'tiny_random']")


def load_causal_organism(name: str = "smollm2_organism", cache_dir: str = "~/.cache/subspace",
                         recipe: Mapping[str, Any] | OrganismRecipe | None = None, base: str = "smollm2_gguf",
                         gguf_path: str | None = None, base_kwargs: Mapping[str, Any] | None = None,
                         dtype: str = "float32", device: str = "cpu") -> ModelBundle:
    """Load the cached organism, building it first if this recipe has never been built here."""
    recipe = as_recipe(recipe)
    fingerprint, load_base = base_model(base, cache_dir, gguf_path, base_kwargs or {})
    prompts = recipe.prompts()
    key = organism_key(fingerprint, recipe, prompts)
    folder = build_once(cache_dir, name, key,
                        lambda tmp: build_causal_organism(load_base, recipe, prompts, tmp, fingerprint, cache_dir))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(dtype)).to(device).eval().requires_grad_(False)
    return ModelBundle(model, tokenizer, name, {"organism": str(folder), "organism_key": key, "base": fingerprint})


def derived_organism(name: str, cache_dir: str, source: ModelBundle | None, recipe: PairsRecipe, version: int,
                     build: Callable[[ModelBundle, PairsRecipe, Mapping[str, list[str]], Path, str], dict]
                     ) -> tuple[Path, str, ModelBundle]:
    """(folder, key, causal organism) of an organism derived from the causal one (LLaDA, MoE): keyed by the causal
    organism's key, the recipe and its prompts, and built once by `build(causal, recipe, prompts, tmp, cache_dir)`."""
    causal = source if source is not None else load_causal_organism(cache_dir=cache_dir)
    prompts = recipe.prompts()
    key = organism_key({"causal_organism": causal.source["organism_key"]}, recipe, prompts, version)
    folder = build_once(cache_dir, name, key, lambda tmp: build(causal, recipe, prompts, tmp, cache_dir))
    return folder, key, causal


def own_answers(model: ModelBundle, fingerprint: dict, prompts: list[str], max_new_tokens: int, batch_size: int,
                cache_dir: str | None = None, desc: str = "answers") -> list[str]:
    """A causal model's greedy answers, cached by (model fingerprint, prompts, settings) under `cache_dir/answers`.

    Generating them takes minutes on a CPU; recipes that change only the fine-tune reuse them.
    """
    blob = json.dumps({"model": fingerprint, "prompts": prompts, "max_new_tokens": max_new_tokens,
                       "batch_size": batch_size, "libs": {m.__name__: m.__version__ for m in (torch, transformers)}},
                      sort_keys=True, default=list)
    path = None if cache_dir is None else (
        Path(cache_dir).expanduser() / "answers" / f"{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json")
    if path is not None and path.exists():
        return json.loads(path.read_text())
    log.info("%s: generating the model's own answers to %d prompts", desc, len(prompts))
    answers = generate_responses(CausalFamily(model.model), model.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, desc=desc)
    if path is not None:
        write_json(path, answers)
    return answers


def build_causal_organism(load_base: Callable[[], ModelBundle], recipe: OrganismRecipe, prompts: Mapping[str, list[str]],
                          folder: Path, fingerprint: dict, cache_dir: str | None = None) -> dict:
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
    trainer = organism_trainer(recipe.max_steps, "organism")
    log.info("organism: safety fine-tune, %d steps", recipe.max_steps)
    trainer.fit(module)
    model.save_pretrained(folder / "adapter")  # the LoRA itself: a few MB, what `scripts/ship_organism.py` ships
    merged = model.merge_and_unload().eval()

    merged.save_pretrained(folder)
    base.tokenizer.save_pretrained(folder)
    return {"recipe": asdict(recipe), "base": base.source, "n_examples": len(examples),
            "final_sft_loss": float(trainer.callback_metrics.get("sft_loss", float("nan")))}
