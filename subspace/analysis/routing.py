"""How a mixture-of-experts model routes: per layer, the router's entropy and each expert's share of the top-k
assignments, on named prompt sets (harmful vs harmless), at the last prompt token and over all prompt tokens.

This is the evidence that a model's experts are experts: a router whose entropy is log(E) everywhere, or whose
shares are the same on every set, makes every expert do the same job, and then an edit of the experts' writers
differs from an edit of a dense MLP in name only.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from subspace.families.base import Family
from subspace.families.causal import CausalFamily

POSITIONS = ("last", "all")  # the token where the response is decided; every real prompt token


def _router_probs(model: PreTrainedModel, batch: dict[str, Tensor]) -> list[Tensor]:
    """Per MoE layer, the router's probabilities `[batch, seq, E]` (the model's own `output_router_logits`)."""
    out = model(**batch, output_router_logits=True, use_cache=False)
    if not out.router_logits:
        raise TypeError(f"{type(model).__name__} returned no router logits; is it a mixture of experts?")
    shape = batch["input_ids"].shape
    return [torch.softmax(logits.float(), -1).reshape(*shape, -1) for logits in out.router_logits]


def has_router_logits(family: Family) -> bool:
    """Whether `routing_stats` can read this model: a MoE whose forward returns router logits (`output_router_logits`,
    `num_experts_per_tok`: the Mixtral-style causal models). DiffusionGemma's experts return none."""
    return bool(family.moe_blocks) and hasattr(family.model.config.get_text_config(), "num_experts_per_tok")


@torch.no_grad()
def routing_stats(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Mapping[str, Sequence[str]],
                  batch_size: int = 16, family: Family | None = None) -> list[dict]:
    """One row per (set, positions, MoE layer): `entropy` (mean over tokens, nats), `share` (fraction of the
    set's top-k assignments that went to each expert: sums to 1) and `n_tokens`."""
    family = family or CausalFamily(model)
    layers = sorted(family.moe_blocks)
    top_k = model.config.get_text_config().num_experts_per_tok
    rows = []
    for name, texts in prompts.items():
        if not texts:
            raise ValueError(f"prompt set {name!r} is empty")
        probs: dict[str, list[list[Tensor]]] = {p: [[] for _ in layers] for p in POSITIONS}
        for start in range(0, len(texts), batch_size):
            batch = family.chat_batch(tokenizer, texts[start:start + batch_size])
            real = batch["attention_mask"].bool()
            for j, layer_probs in enumerate(_router_probs(model, batch)):
                probs["last"][j].append(layer_probs[:, -1].cpu())  # chat batches are left-padded
                probs["all"][j].append(layer_probs[real].cpu())
        for positions in POSITIONS:
            for layer, chunks in zip(layers, probs[positions]):
                p = torch.cat(chunks)
                entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
                counts = torch.bincount(p.topk(top_k, dim=-1).indices.reshape(-1), minlength=p.shape[-1])
                rows.append({"set": name, "positions": positions, "layer": layer, "entropy": float(entropy),
                             "share": (counts / counts.sum()).tolist(), "n_tokens": p.shape[0]})
    return rows


def format_routing_table(rows: Sequence[dict]) -> str:
    """The rows as fixed-width text: one line per row, the shares in percent, the entropy beside its maximum."""
    if not rows:
        return ""
    experts = len(rows[0]["share"])
    head = (f"{'set':<12} {'positions':<9} {'layer':>5} {'entropy':>7} (max {math.log(experts):.3f})  "
            + " ".join(f"e{e:<4}" for e in range(experts)))
    lines = [f"{r['set']:<12} {r['positions']:<9} {r['layer']:>5} {r['entropy']:>7.3f}{'':13}  "
             + " ".join(f"{100 * s:4.0f}%" for s in r["share"]) for r in rows]
    return "\n".join([head, *lines])
