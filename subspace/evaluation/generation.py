"""Greedy, batched, left-padded generation with the family's own sampler, decoded up to the first stop token."""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from subspace.families.base import Family


def generate_responses(family: Family, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], **kwargs) -> list[str]:
    """Decoded greedy continuations, in the order of `prompts`."""
    ids = generate_token_ids(family, tokenizer, prompts, **kwargs)
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


@torch.no_grad()
def generate_token_ids(family: Family, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
                       max_new_tokens: int = 96, batch_size: int = 16, system_prompt: str | None = None,
                       desc: str = "generating", progress: bool = True) -> list[list[int]]:
    """The sampled token ids of each response, cut before its first stop token, in the order of `prompts`: what
    the model emitted, which re-tokenising the decoded text need not give back (a leading space, a merge).

    Prompts are batched by length so little padding is generated; the order is restored after.
    """
    stop = family.stop_token_ids(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    responses: dict[int, list[int]] = {}
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc=desc, disable=not progress, leave=False):
        batch = family.chat_batch(tokenizer, [prompts[i] for i in idx], system_prompt)
        new = family.generate(tokenizer, batch, max_new_tokens)
        for i, row in zip(idx, until_stop(new, stop)):
            responses[i] = row
    return [responses[i] for i in range(len(prompts))]


def until_stop(tokens: torch.Tensor, stop: set[int]) -> list[list[int]]:
    """Each row cut before its first stop token (a diffusion canvas may hold text after an end-of-turn)."""
    rows = []
    for row in tokens.tolist():
        cut = next((j for j, t in enumerate(row) if t in stop), len(row))
        rows.append(row[:cut])
    return rows
