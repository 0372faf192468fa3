"""Greedy, batched, left-padded generation with the family's own sampler, decoded up to the first stop token."""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from subspace.families.base import Family


@torch.no_grad()
def generate_responses(family: Family, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
                       max_new_tokens: int = 48, batch_size: int = 16,
                       system_prompt: str | None = None, desc: str = "generating", progress: bool = True) -> list[str]:
    """Decoded greedy continuations, in the order of `prompts`.

    Prompts are batched by length so little padding is generated; the order is restored after.
    """
    stop = family.stop_token_ids(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    responses: dict[int, str] = {}
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc=desc, disable=not progress, leave=False):
        batch = family.chat_batch(tokenizer, [prompts[i] for i in idx], system_prompt)
        new = family.generate(tokenizer, batch, max_new_tokens)
        for i, text in zip(idx, tokenizer.batch_decode(until_stop(new, stop), skip_special_tokens=True)):
            responses[i] = text.strip()
    return [responses[i] for i in range(len(prompts))]


def until_stop(tokens: torch.Tensor, stop: set[int]) -> list[list[int]]:
    """Each row cut before its first stop token (a diffusion canvas may hold text after an end-of-turn)."""
    rows = []
    for row in tokens.tolist():
        cut = next((j for j, t in enumerate(row) if t in stop), len(row))
        rows.append(row[:cut])
    return rows
