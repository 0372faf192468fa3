"""Difference of class means of the residual stream, per layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from subspace.families.base import Family


@dataclass
class ClassMeans:
    """Mean residual entering each layer where the response is decided: [num_layers, d] per class."""

    harmful: Tensor
    harmless: Tensor

    @property
    def difference(self) -> Tensor:
        """r_l = mean(h_harmful) − mean(h_harmless)."""
        return self.harmful - self.harmless

    @property
    def directions(self) -> Tensor:
        return torch.nn.functional.normalize(self.difference, dim=-1)

    @property
    def cosine(self) -> Tensor:
        """Cosine of the two class means per layer: the separation curve (a dip where refusal lives)."""
        return torch.nn.functional.cosine_similarity(self.harmful, self.harmless, dim=-1)


def residual_batches(family: Family, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], batch_size: int,
                     system_prompt: str | None, desc: str) -> Iterator[Tensor]:
    """`family.residuals` of consecutive prompt batches, [num_layers, batch, d] each, in prompt order."""
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        yield family.residuals(family.chat_batch(tokenizer, prompts[i: i + batch_size], system_prompt))


def _mean_residual(family: Family, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                   batch_size: int, system_prompt: str | None, desc: str) -> Tensor:
    total = None
    for residuals in residual_batches(family, tokenizer, prompts, batch_size, system_prompt, desc):
        summed = residuals.sum(dim=1)
        total = summed if total is None else total + summed
    return total / len(prompts)


def class_means(family: Family, tokenizer: PreTrainedTokenizerBase, harmful: Sequence[str],
                harmless: Sequence[str], batch_size: int = 16, system_prompt: str | None = None) -> ClassMeans:
    return ClassMeans(_mean_residual(family, tokenizer, harmful, batch_size, system_prompt, "means: harmful"),
                      _mean_residual(family, tokenizer, harmless, batch_size, system_prompt, "means: harmless"))
