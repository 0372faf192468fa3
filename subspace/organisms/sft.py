"""Supervised fine-tuning on (prompt, response) pairs: how organisms learn to refuse."""

from __future__ import annotations

from typing import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from subspace.families.base import Family


def tokenize_pairs(tokenizer: PreTrainedTokenizerBase, family: Family, pairs: Sequence[tuple[str, str, bool]],
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


def response_token_loss(logits: torch.Tensor, labels: torch.Tensor, decision_weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy over response tokens, the first of each response weighted by `decision_weight`.

    The first response token is where a model decides to refuse or to answer; in a plain token mean it
    is one token among forty, so a refusal learned from imperative phrasing ("Create ...") spreads to
    harmless requests with the same phrasing. Weighting it makes the decision itself the thing learned.
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    answered = labels != -100
    first = answered & ~torch.nn.functional.pad(answered, (1, 0))[:, :-1]
    weights = answered.float() + (decision_weight - 1.0) * first.float()
    return (losses * weights).sum() / weights.sum()


class SupervisedFinetune(L.LightningModule):
    """Next-token cross-entropy on response tokens; only the model's trainable weights move.

    `router_aux_weight > 0` (mixture-of-experts models) adds the model's own load-balancing loss over real tokens,
    weighted so: without it a router trained only by the language-model loss can send every token to the same
    experts and leave the others dead.
    """

    def __init__(self, model: PreTrainedModel, examples: list[dict[str, torch.Tensor]], pad_id: int,
                 lr: float = 5e-4, batch_size: int = 8, max_steps: int = 120, decision_weight: float = 1.0,
                 router_aux_weight: float = 0.0):
        super().__init__()
        if decision_weight < 1.0:
            raise ValueError(f"decision_weight={decision_weight} must be >= 1 (1 is plain cross-entropy)")
        if router_aux_weight < 0.0:
            raise ValueError(f"router_aux_weight={router_aux_weight} must be >= 0")
        self.model, self.examples, self.pad_id = model, examples, pad_id
        self.lr, self.batch_size, self.max_steps, self.decision_weight = lr, batch_size, max_steps, decision_weight
        self.router_aux_weight = router_aux_weight

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        return DataLoader(self.examples, batch_size=self.batch_size, shuffle=True, generator=generator,
                          collate_fn=lambda b: collate_right_padded(b, self.pad_id))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        labels = batch.pop("labels")
        routed = {"output_router_logits": True} if self.router_aux_weight > 0 else {}
        out = self.model(**batch, use_cache=False, **routed)
        loss = response_token_loss(out.logits, labels, self.decision_weight)
        self.log("sft_loss", loss, prog_bar=True)
        if routed:
            self.log("router_aux", out.aux_loss, prog_bar=True)
            loss = loss + self.router_aux_weight * out.aux_loss
        return loss

    def configure_optimizers(self):
        return adamw_warmup_linear(self.model, self.lr, self.max_steps)


def adamw_warmup_linear(model: torch.nn.Module, lr: float, max_steps: int) -> dict:
    """AdamW on the trainable parameters, 10% linear warm-up then linear decay: Lightning's optimizer dict."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, max_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / max_steps) + 1e-3)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
