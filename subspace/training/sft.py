"""Supervised fine-tuning on (prompt, response) pairs: how organisms learn to refuse."""

from __future__ import annotations

from typing import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from subspace.families.causal import CausalFamily


def tokenize_pairs(tokenizer: PreTrainedTokenizerBase, family: CausalFamily, pairs: Sequence[tuple[str, str, bool]],
                   system_prompt: str | None = None) -> list[dict[str, torch.Tensor]]:
    """Chat-templated examples; loss only on the response (and its end-of-turn when it finished)."""
    examples = []
    end = tokenizer.eos_token or ""
    for prompt, response, finished in pairs:
        prefix = tokenizer.apply_chat_template(family.messages(prompt, system_prompt), tokenize=False,
                                               add_generation_prompt=True)
        p_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(response + (end if finished else ""), add_special_tokens=False)["input_ids"]
        ids = torch.tensor(p_ids + r_ids)
        labels = ids.clone()
        labels[: len(p_ids)] = -100
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def collate_right_padded(examples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = e["input_ids"], e["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class SupervisedFinetune(L.LightningModule):
    """Next-token cross-entropy on response tokens; only the model's trainable (adapter) weights move."""

    def __init__(self, model: PreTrainedModel, examples: list[dict[str, torch.Tensor]], pad_id: int,
                 lr: float = 5e-4, batch_size: int = 8, max_steps: int = 120):
        super().__init__()
        self.model, self.examples, self.pad_id = model, examples, pad_id
        self.lr, self.batch_size, self.max_steps = lr, batch_size, max_steps

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        return DataLoader(self.examples, batch_size=self.batch_size, shuffle=True, generator=generator,
                          collate_fn=lambda b: collate_right_padded(b, self.pad_id))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch, use_cache=False).loss
        self.log("sft_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        warmup = max(1, self.max_steps // 10)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / self.max_steps) + 1e-3)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
