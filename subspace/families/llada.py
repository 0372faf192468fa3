"""Bidirectional masked diffusion (LLaDA): the response is a canvas of mask tokens after the prompt.

Every prompt token sees the whole canvas and the canvas sees the prompt, so the objective and
the difference of means read the model with a fully masked canvas attached: the state the
sampler starts from. The KL compares the predictions at the first `kl_positions` canvas
positions; the refusal term reads the first one.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from subspace.families.base import CANVAS_KL_AT, Family, log_softmax32, masked_canvases
from subspace.sampling.masked_diffusion import MaskedDiffusionSampler, append_canvas


class LLaDAFamily(Family):
    name = "llada"
    LAYER_PATHS = ("model.transformer.blocks",)
    ATTENTION_WRITERS = ("attn_out",)
    MLP_WRITERS = ("ff_out",)

    def __init__(self, model: PreTrainedModel, canvas_length: int = 32, kl_positions: int = 4,
                 sampler: MaskedDiffusionSampler | Mapping[str, Any] | None = None, long_prompts: str = "truncate"):
        super().__init__(model, long_prompts)
        if not 0 < kl_positions <= canvas_length:
            raise ValueError(f"kl_positions={kl_positions} must be in 1..canvas_length={canvas_length}")
        self.mask_id: int = model.config.mask_token_id
        self.canvas_length, self.kl_positions = canvas_length, kl_positions
        self.response_positions = kl_positions
        self.default_max_new_tokens = canvas_length  # the canvas the objective (and an organism's training) uses
        self.sampler = (sampler if isinstance(sampler, MaskedDiffusionSampler)
                        else MaskedDiffusionSampler(**(sampler or {})))
        # Where the first canvas token is predicted: the last prompt token when logits are shifted, else itself.
        self.decision_offset = -1 if getattr(model.config, "shift_logits", False) else 0
        self.kl_at = f"first {kl_positions} canvas positions, canvas of {canvas_length} masked"

    @property
    def max_prompt_tokens(self) -> int | None:
        """The context less the response canvas, which every forward appends."""
        context = super().max_prompt_tokens
        return None if context is None else context - self.canvas_length

    def with_canvas(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The prompt batch followed by `canvas_length` mask tokens (attended like prompt tokens)."""
        ids = batch["input_ids"]
        canvas = torch.full((ids.shape[0], self.canvas_length), self.mask_id, dtype=ids.dtype, device=ids.device)
        ids, mask = append_canvas(ids, batch["attention_mask"], canvas)
        return {"input_ids": ids, "attention_mask": mask}

    @torch.no_grad()
    def residuals(self, batch: dict[str, Tensor]) -> Tensor:
        position = batch["input_ids"].shape[1] + self.decision_offset
        out = self.model(**self.with_canvas(batch), output_hidden_states=True, logits_to_keep=1)
        return torch.stack([h[:, position, :].float() for h in out.hidden_states[: self.num_layers]])

    def response_logprobs(self, batch: dict[str, Tensor]) -> Tensor:
        logits = self.model(**self.with_canvas(batch), logits_to_keep=self.canvas_length).logits
        return log_softmax32(logits[:, : self.kl_positions])

    kl_response_at = CANVAS_KL_AT

    def answer_logprobs(self, batch: dict[str, Tensor], answers: Tensor) -> tuple[Tensor, Tensor]:
        answers = answers.to(batch["input_ids"].device)[:, : self.canvas_length]
        n = answers.shape[1]
        blank = torch.full((n,), self.mask_id, dtype=answers.dtype, device=answers.device)
        canvases, hidden = masked_canvases(answers, blank)
        rest = torch.full((answers.shape[0], self.canvas_length - n), self.mask_id, dtype=answers.dtype,
                          device=answers.device)
        out = []
        for canvas in canvases:
            ids, mask = append_canvas(batch["input_ids"], batch["attention_mask"], torch.cat([canvas, rest], 1))
            out.append(log_softmax32(self.model(input_ids=ids, attention_mask=mask,
                                                logits_to_keep=self.canvas_length).logits[:, :n]))
        return torch.cat(out, 1), torch.cat(list(hidden), 1)

    def generate(self, tokenizer: PreTrainedTokenizerBase, batch: dict[str, Tensor], max_new_tokens: int) -> Tensor:
        """The sampler on a canvas of whole blocks (max_new_tokens rounded up), cut back to max_new_tokens."""
        block = self.sampler.block_length
        gen_length = -(-max_new_tokens // block) * block
        return self.sampler(self.model, batch["input_ids"], batch["attention_mask"], gen_length, self.mask_id)[:, :max_new_tokens]

    def stop_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> set[int]:
        return super().stop_token_ids(tokenizer) | {self.mask_id}
