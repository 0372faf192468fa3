"""Paired harmful/harmless batches for the subspace objective."""

from __future__ import annotations

from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from subspace.families.base import Family


class PairedPromptDataModule(L.LightningDataModule):
    """Each batch: {"harmful": chat batch, "harmless": chat batch + "index"} (index keys the cached original distributions)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, family: Family, harmful: Sequence[str],
                 harmless: Sequence[str], batch_size: int = 8, system_prompt: str | None = None,
                 max_length: int | None = 256, seed: int = 0):
        super().__init__()
        self.tokenizer, self.family = tokenizer, family
        self.harmful, self.harmless = list(harmful), list(harmless)
        self.batch_size, self.system_prompt, self.max_length, self.seed = batch_size, system_prompt, max_length, seed

    def collate(self, prompts: list[str], indices: list[int] | None = None) -> dict[str, torch.Tensor]:
        batch = self.family.chat_batch(self.tokenizer, prompts, self.system_prompt, self.max_length)
        if indices is not None:
            batch["index"] = torch.tensor(indices)
        return batch

    def _loader(self, prompts: list[str], with_index: bool, seed: int) -> DataLoader:
        items = list(enumerate(prompts))
        collate = lambda b: self.collate([p for _, p in b], [i for i, _ in b] if with_index else None)  # noqa: E731
        return DataLoader(items, batch_size=self.batch_size, shuffle=True, collate_fn=collate,
                          generator=torch.Generator().manual_seed(seed))

    def train_dataloader(self) -> CombinedLoader:
        return CombinedLoader({"harmful": self._loader(self.harmful, False, self.seed),
                               "harmless": self._loader(self.harmless, True, self.seed + 1)}, mode="max_size_cycle")
