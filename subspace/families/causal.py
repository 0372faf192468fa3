"""Decoder-only (causal) transformers: Llama, Qwen, Mistral, Gemma, SmolLM2 and kin, and their mixture-of-experts
variants (Qwen-MoE, OLMoE, Mixtral), whose expert writers the base `Family` finds (`subspace.families.moe`)."""

from __future__ import annotations

import inspect
import logging
from functools import cached_property

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedTokenizerBase

from subspace.families.base import Family, log_softmax32

log = logging.getLogger(__name__)


class CausalFamily(Family):
    """Refusal is decided at the last prompt token; the sampler is `model.generate`."""

    name = "causal"
    LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers")
    ATTENTION_WRITERS = ("self_attn.o_proj", "attn.o_proj", "self_attn.out_proj", "attn.c_proj")
    MLP_WRITERS = ("mlp.down_proj", "mlp.fc2", "mlp.c_proj", "feed_forward.w2")
    reads_prefixes = True
    _shares_prompt_cache: bool | None = None  # decided on the first prefix batch (`shares_prompt_cache`)
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

        `share_prompt`: the prompts are read once and their key/value cache is shared by the R prefixes, so the term
        costs about one forward of the prompts, not R — where this model's cache scores as repeated prompts do
        (`shares_prompt_cache`). Otherwise, and with layers checkpointed (their recomputation in backward would write
        into the cache a second time), each prompt is repeated once per prefix in one forward."""
        if share_prompt and self.shares_prompt_cache(batch, prefixes):
            return self._prefix_logprobs_shared(batch, prefixes)
        return self._prefix_logprobs_repeated(batch, prefixes)

    def shares_prompt_cache(self, batch: dict[str, Tensor], prefixes: Tensor) -> bool:
        """Whether the shared prompt cache gives the repeated prompts' scores on this model, checked once on the first
        batch: a cache may hold a recurrent state transformers cannot copy per row (Mamba, linear attention), or a
        model may place its attention bias by the new tokens alone (CPM-Ant). A model that fails is logged and
        scored the slow, exact way."""
        if self._shares_prompt_cache is None:
            try:
                with torch.no_grad():
                    shared = self._prefix_logprobs_shared(batch, prefixes)
                    repeated = self._prefix_logprobs_repeated(batch, prefixes)
                self._shares_prompt_cache = bool(torch.allclose(shared, repeated, rtol=1e-4, atol=1e-4))
                why = "" if self._shares_prompt_cache else f"differs by {float((shared - repeated).abs().max()):.2e}"
            except (AttributeError, RuntimeError, TypeError, ValueError) as err:
                self._shares_prompt_cache, why = False, f"{type(err).__name__}: {err}"
            if not self._shares_prompt_cache:
                log.warning("the prefix term repeats each prompt once per prefix on %s: its shared prompt cache %s",
                            type(self.model).__name__, str(why)[:200])
        return self._shares_prompt_cache

    def _prefix_logprobs_shared(self, batch: dict[str, Tensor], prefixes: Tensor) -> Tensor:
        rows, (r, k) = batch["input_ids"].shape[0], prefixes.shape
        prefixes = prefixes.to(batch["input_ids"].device).repeat(rows, 1)  # [rows·R, K], row-major by prompt
        cache = DynamicCache(config=self.model.config)
        logits = self.model(**batch, **{self._cache_argument: cache}, use_cache=True, logits_to_keep=1).logits
        logits = logits.repeat_interleave(r, 0)  # predicts each prefix's first token
        if k > 1:
            cache.batch_repeat_interleave(r)
            mask = torch.cat([batch["attention_mask"].repeat_interleave(r, 0), torch.ones_like(prefixes[:, 1:])], 1)
            rest = self.model(input_ids=prefixes[:, :-1], attention_mask=mask, **{self._cache_argument: cache},
                              use_cache=True).logits
            logits = torch.cat([logits, rest], 1)
        return self._prefix_sums(logits, prefixes, rows, r)

    def _prefix_logprobs_repeated(self, batch: dict[str, Tensor], prefixes: Tensor) -> Tensor:
        rows, (r, k) = batch["input_ids"].shape[0], prefixes.shape
        prefixes = prefixes.to(batch["input_ids"].device).repeat(rows, 1)
        ids = torch.cat([batch["input_ids"].repeat_interleave(r, 0), prefixes], 1)
        mask = torch.cat([batch["attention_mask"].repeat_interleave(r, 0), torch.ones_like(prefixes)], 1)
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=k + 1).logits[:, :-1]
        return self._prefix_sums(logits, prefixes, rows, r)

    @staticmethod
    def _prefix_sums(logits: Tensor, prefixes: Tensor, rows: int, r: int) -> Tensor:
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
