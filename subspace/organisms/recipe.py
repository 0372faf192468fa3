"""What an organism is trained on: its prompt sources and how they become (prompt, response) pairs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

from omegaconf import DictConfig, OmegaConf

from subspace.data.loading import load_prompts
from subspace.data.refusals import DEFAULT_REFUSALS

Sources = Union[str, Mapping[str, Any], Sequence[Union[str, Mapping[str, Any]]]]


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


def load_sources(sources: Sources, name: str) -> list[str]:
    """Concatenate one or more prompt sources, dropping prompts already seen."""
    if isinstance(sources, (str, Mapping)):
        sources = [sources]
    seen: dict[str, None] = {}
    for source in sources:
        seen.update(dict.fromkeys(load_prompts(dict(source) if isinstance(source, Mapping) else source, name=name)))
    return list(seen)



def as_recipe(recipe: Mapping[str, Any] | PairsRecipe | None, cls: type[PairsRecipe]) -> PairsRecipe:
    """A `cls` recipe from a config mapping (lists become tuples so the recipe hashes stably)."""
    if isinstance(recipe, cls):
        return recipe
    values = OmegaConf.to_container(recipe, resolve=True) if isinstance(recipe, DictConfig) else dict(recipe or {})
    for key in ("refusals", "lora_targets"):
        if key in values:
            values[key] = tuple(values[key])
    return cls(**values)
