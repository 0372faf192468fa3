"""Masked-diffusion fine-tuning on (prompt, response canvas) pairs: how the LLaDA organism learns.

The prompt is never masked. Each example draws a mask ratio t ~ U(min_ratio, 1), masks each
canvas token with probability t and is scored by cross-entropy on the masked tokens weighted
1/t (LLaDA's objective, an upper bound on the negative log-likelihood). The canvas is the
response followed by end-of-turn tokens up to its fixed length, so the model also learns where to stop.
"""

from __future__ import annotations

from typing import Sequence

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from subspace.families.base import Family
from subspace.sampling.masked_diffusion import append_canvas
from subspace.organisms.sft import adamw_warmup_linear


def canvas_examples(tokenizer: PreTrainedTokenizerBase, family: Family, pairs: Sequence[tuple[str, str, bool]],
                    canvas_length: int, fill_id: int) -> list[dict[str, Tensor]]:
    """{"prompt": chat-templated prompt ids, "canvas": response ids cut or filled with `fill_id` to canvas_length}."""
    examples = []
    for prompt, response, _ in pairs:
        prefix = tokenizer.apply_chat_template(family.messages(prompt, None), tokenize=False, add_generation_prompt=True)
        p_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(response, add_special_tokens=False)["input_ids"][:canvas_length]
        canvas = r_ids + [fill_id] * (canvas_length - len(r_ids))
        examples.append({"prompt": torch.tensor(p_ids), "canvas": torch.tensor(canvas)})
    return examples


def collate_left_padded(examples: list[dict[str, Tensor]], pad_id: int) -> dict[str, Tensor]:
    width = max(len(e["prompt"]) for e in examples)
    prompt = torch.full((len(examples), width), pad_id)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["prompt"])
        prompt[i, width - n:], mask[i, width - n:] = e["prompt"], 1
    return {"prompt": prompt, "prompt_mask": mask, "canvas": torch.stack([e["canvas"] for e in examples])}


class MaskedDiffusionFinetune(L.LightningModule):
    """Full fine-tune of a bidirectional model on the masked-token objective; logits[:, j] predicts token j."""

    def __init__(self, model: PreTrainedModel, examples: list[dict[str, Tensor]], pad_id: int, mask_id: int,
                 lr: float = 1e-4, batch_size: int = 16, max_steps: int = 400, min_ratio: float = 1e-3, seed: int = 0):
        super().__init__()
        self.model, self.examples, self.pad_id, self.mask_id = model, examples, pad_id, mask_id
        self.lr, self.batch_size, self.max_steps, self.min_ratio, self.seed = lr, batch_size, max_steps, min_ratio, seed

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.examples, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed),
                          collate_fn=lambda b: collate_left_padded(b, self.pad_id))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        canvas = batch["canvas"]
        t = torch.rand(canvas.shape[0], 1, device=canvas.device) * (1 - self.min_ratio) + self.min_ratio
        masked = torch.rand(canvas.shape, device=canvas.device) < t
        noisy = canvas.masked_fill(masked, self.mask_id)
        ids, attention = append_canvas(batch["prompt"], batch["prompt_mask"], noisy)
        logits = self.model(input_ids=ids, attention_mask=attention, logits_to_keep=canvas.shape[1]).logits.float()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), canvas, reduction="none")
        loss = ((losses * masked / t).sum(1) / canvas.shape[1]).mean()
        self.log("diffusion_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return adamw_warmup_linear(self.model, self.lr, self.max_steps)
