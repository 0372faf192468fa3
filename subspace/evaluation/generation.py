"""Greedy, batched, left-padded generation with the model's own `generate`."""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from subspace.families.causal import CausalFamily


@torch.no_grad()
def generate_responses(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, family: CausalFamily,
                       prompts: Sequence[str], *, max_new_tokens: int = 48, batch_size: int = 16,
                       system_prompt: str | None = None, desc: str = "generating", progress: bool = True) -> list[str]:
    """Decoded greedy continuations, in the order of `prompts`.

    Prompts are batched by length so little padding is generated; the order is restored after.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    responses: dict[int, str] = {}
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc=desc, disable=not progress, leave=False):
        batch = family.chat_batch(tokenizer, [prompts[i] for i in idx], system_prompt)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                             top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
            responses[i] = text.strip()
    return [responses[i] for i in range(len(prompts))]
