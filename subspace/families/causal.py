"""Decoder-only (causal) transformers: Llama, Qwen, Mistral, Gemma, SmolLM2 and kin, and their mixture-of-experts
variants (Qwen-MoE, OLMoE, Mixtral), whose expert writers the base `Family` finds (`subspace.families.moe`)."""

from __future__ import annotations

import inspect
from functools import cached_property

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedTokenizerBase

from subspace.families.base import Family, log_softmax32


class CausalFamily(Family):
    """Refusal is decided at the last prompt token; the sampler is `model.generate`."""

    name = "causal"
    LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers")
    ATTENTION_WRITERS = ("self_attn.o_proj", "attn.o_proj", "self_attn.out_proj", "attn.c_proj")
    MLP_WRITERS = ("mlp.down_proj", "mlp.fc2", "mlp.c_proj", "feed_forward.w2")
    reads_prefixes = True
    TRACE_WRITERS = True  # writers found by structure; the name lists above are hints (a model on `meta`)

    @torch.no_grad()
    def residuals(self, batch: dict[str, Tensor]) -> Tensor:
        out = self.model(**batch, output_hidden_states=True, use_cache=False, logits_to_keep=1)
        return torch.stack([h[:, -1, :].float() for h in out.hidden_states[: self.num_layers]])

    def response_logprobs(self, batch: dict[str, Tensor]) -> Tensor:
        return log_softmax32(self.model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1:, :])

    def prefix_logprobs(self, batch: dict[str, Tensor], prefixes: Tensor, share_prompt: bool = True) -> Tensor:
        """log P(prefix | prompt) for every prompt and each of R prefixes [batch, R]; the prompts are left-padded, so
        each prefix starts right after its prompt.

        `share_prompt`: the prompts are read once and their key/value cache is shared by the R prefixes, so the
        term costs about one forward of the prompts, not R. Without it (layers checkpointed: their recomputation in
        backward would write into the cache a second time), or where the cache holds a recurrent state that
        transformers cannot copy per row, each prompt is repeated once per prefix in one forward."""
        rows, (r, k) = batch["input_ids"].shape[0], prefixes.shape
        prefixes = prefixes.to(batch["input_ids"].device).repeat(rows, 1)  # [rows·R, K], row-major by prompt
        mask = torch.cat([batch["attention_mask"].repeat_interleave(r, 0), torch.ones_like(prefixes)], 1)
        cache = DynamicCache(config=self.model.config) if share_prompt else None
        if cache is not None and not all(hasattr(layer, "batch_repeat_interleave") for layer in cache.layers):
            cache = None  # a recurrent state (Mamba, linear attention) transformers cannot copy per row
        if cache is not None:
            logits = self.model(**batch, **{self._cache_argument: cache}, use_cache=True, logits_to_keep=1).logits
            logits = logits.repeat_interleave(r, 0)  # predicts each prefix's first token
            if k > 1:
                cache.batch_repeat_interleave(r)
                rest = self.model(input_ids=prefixes[:, :-1], attention_mask=mask[:, :-1],
                                  **{self._cache_argument: cache}, use_cache=True).logits
                logits = torch.cat([logits, rest], 1)
        else:
            ids = torch.cat([batch["input_ids"].repeat_interleave(r, 0), prefixes], 1)
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=k + 1).logits[:, :-1]
        token_logprobs = log_softmax32(logits).gather(-1, prefixes.unsqueeze(-1)).squeeze(-1)
        return token_logprobs.sum(-1).view(rows, r)

    @cached_property
    def _cache_argument(self) -> str:
        """The forward's name for a key/value cache: transformers 5 renamed `past_key_values` to `cache`."""
        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def answer_logprobs(self, batch: dict[str, Tensor], answers: Tensor) -> tuple[Tensor, Tensor]:
        """Each answer token predicted after the (left-padded) prompt and the answer tokens before it."""
        answers = answers.to(batch["input_ids"].device)
        valid = answers >= 0
        ids = torch.cat([batch["input_ids"], answers.clamp(min=0)], 1)
        mask = torch.cat([batch["attention_mask"], valid.to(batch["attention_mask"].dtype)], 1)
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=answers.shape[1] + 1).logits
        return log_softmax32(logits[:, :-1]), valid

    def generate(self, tokenizer: PreTrainedTokenizerBase, batch: dict[str, Tensor], max_new_tokens: int) -> Tensor:
        out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                  top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
        return out[:, batch["input_ids"].shape[1]:]
