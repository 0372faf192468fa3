"""Per-prompt residuals of both classes, read where the family says the response is decided.

`class_means` (methods/directions.py) keeps only running sums; the geometry needs every prompt's
residual (probes, PCA), so this reads them one batch at a time through the same `Family.residuals`
and `chat_batch` and derives the class means from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from subspace.families.base import Family
from subspace.methods.directions import ClassMeans, residual_batches


@dataclass
class ClassResiduals:
    """Residual entering each layer, per prompt: [num_layers, n, d] float32 on the CPU, per class."""

    harmful: Tensor
    harmless: Tensor

    @property
    def means(self) -> ClassMeans:
        return ClassMeans(self.harmful.mean(dim=1), self.harmless.mean(dim=1))

    @property
    def num_layers(self) -> int:
        return self.harmful.shape[0]

    def pooled(self, layer: int) -> Tensor:
        """Both classes at one layer, harmful rows first: [n + m, d]."""
        return torch.cat([self.harmful[layer], self.harmless[layer]])


def prompt_residuals(family: Family, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                     batch_size: int = 16, system_prompt: str | None = None, desc: str = "residuals") -> Tensor:
    """[num_layers, len(prompts), d]: `family.residuals` of each prompt, in order, moved to the CPU."""
    if not prompts:
        raise ValueError(f"no prompts to read residuals from ({desc})")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be a positive integer")
    batches = residual_batches(family, tokenizer, prompts, batch_size, system_prompt, desc)
    chunks = [residuals.float().cpu() for residuals in batches]
    return torch.cat(chunks, dim=1)


def class_residuals(family: Family, tokenizer: PreTrainedTokenizerBase, harmful: Sequence[str],
                    harmless: Sequence[str], batch_size: int = 16, system_prompt: str | None = None,
                    label: str = "") -> ClassResiduals:
    """Both classes' per-prompt residuals (inside `edit.applied(model)` they are the edited model's)."""
    read = lambda prompts, name: prompt_residuals(  # noqa: E731
        family, tokenizer, prompts, batch_size, system_prompt, f"residuals: {name}{label}")
    return ClassResiduals(read(harmful, "harmful"), read(harmless, "harmless"))
