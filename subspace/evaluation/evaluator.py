"""Before/after evaluation of an edit with the model's own sampler and the first-token KL."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from subspace.evaluation.generation import generate_responses
from subspace.evaluation.judges import MarkerJudge, RefusalJudge
from subspace.evaluation.metrics import ResponseKL, RefusalRate
from subspace.families.base import Family
from subspace.interventions.edit import ProjectionEdit
from subspace.models.bundle import ModelBundle

log = logging.getLogger(__name__)
APPLY_MODES = ("hooks", "merged")


@dataclass
class Evaluator:
    """Everything about how a model is judged: sampler settings, judge, batch sizes, how an edit is applied.

    `apply="hooks"` projects the writers' outputs (activation form); `apply="merged"` adds the edit into the
    weights for the block and restores them after (weight form: what a merged checkpoint would generate).
    A family with `requires_weight_form` (DiffusionGemma: encoder and decoder run one set of tensors) is always
    evaluated in weight form: `apply="hooks"` is switched to "merged" with a warning, not refused, so the default
    configuration runs on it; an edit without a weight form (moe_scope=layer_output) keeps its hooks.
    """

    bundle: ModelBundle
    family: Family
    judge: RefusalJudge = MarkerJudge()
    max_new_tokens: int | None = None  # None: the family's default (48 tokens; a masked-diffusion model's canvas)
    batch_size: int = 16
    system_prompt: str | None = None
    progress: bool = True
    apply: str = "hooks"

    def __post_init__(self) -> None:
        if self.max_new_tokens is None:
            self.max_new_tokens = self.family.default_max_new_tokens
        if self.apply not in APPLY_MODES:
            raise ValueError(f"eval.apply={self.apply!r} must be one of {APPLY_MODES}")
        if self.apply == "hooks" and self.family.requires_weight_form:
            log.warning("eval.apply=hooks switched to merged: the %s family is evaluated in weight form (the edit is "
                        "merged into the shared tensors for generation and KL, restored bit-exactly after)",
                        self.family.name)
            self.apply = "merged"

    def _edited(self, edit: ProjectionEdit | None):
        if edit is None:
            return nullcontext()
        model = self.bundle.model
        if self.apply == "merged" and self.family.requires_weight_form and not edit.has_weight_form(model):
            log.info("this edit has no weight form (module-output sites: moe_scope=layer_output, or edit_at=residual): "
                     "evaluated with hooks, on every module running the site's weights")
            return edit.applied(model)
        return edit.merged(model) if self.apply == "merged" else edit.applied(model)

    def responses(self, prompts: Sequence[str], edit: ProjectionEdit | None = None, desc: str = "generating",
                  max_new_tokens: int | None = None) -> list[str]:
        with self._edited(edit):
            return generate_responses(self.family, self.bundle.tokenizer, prompts,
                                      max_new_tokens=max_new_tokens or self.max_new_tokens, batch_size=self.batch_size,
                                      system_prompt=self.system_prompt, desc=desc, progress=self.progress)

    def refusals(self, prompts: Sequence[str], edit: ProjectionEdit | None = None, desc: str = "generating",
                 max_new_tokens: int | None = None) -> tuple[float, list[str], list[bool]]:
        """(refusal rate, responses, per-prompt refusal flags)."""
        texts = self.responses(prompts, edit, desc, max_new_tokens)
        flags = [self.judge.is_refusal(p, r) for p, r in zip(prompts, texts)]
        metric = RefusalRate()
        metric.update(torch.tensor(flags))
        return float(metric.compute()), texts, flags

    @torch.no_grad()
    def logprobs(self, prompts: Sequence[str], edit: ProjectionEdit | None = None) -> Tensor:
        """Log-probabilities at the family's response positions, [n, positions, vocab] float32."""
        chunks = []
        with self._edited(edit):
            for i in range(0, len(prompts), self.batch_size):
                batch = self.family.chat_batch(self.bundle.tokenizer, prompts[i: i + self.batch_size], self.system_prompt)
                chunks.append(self.family.response_logprobs(batch))
        return torch.cat(chunks)

    def kl(self, prompts: Sequence[str], edit: ProjectionEdit, reference: Tensor | None = None) -> float:
        reference = self.logprobs(prompts) if reference is None else reference
        metric = ResponseKL()
        metric.update(reference, self.logprobs(prompts, edit))
        return float(metric.compute())

    def before_after(self, harmful: Sequence[str], harmless: Sequence[str], edit: ProjectionEdit) -> tuple[dict, list[dict]]:
        """The report metrics (before and after measured in the same run) and per-prompt samples."""
        results, samples = {}, []
        for split, prompts, key in (("harmful", harmful, "refusal_rate"), ("harmless", harmless, "harmless_refusal_rate")):
            rate_b, text_b, flag_b = self.refusals(prompts, None, f"{split} before")
            rate_a, text_a, flag_a = self.refusals(prompts, edit, f"{split} after")
            results[f"{key}_before"], results[f"{key}_after"] = rate_b, rate_a
            samples += [{"split": split, "prompt": p, "before": b, "after": a, "refused_before": fb, "refused_after": fa}
                        for p, b, a, fb, fa in zip(prompts, text_b, text_a, flag_b, flag_a)]
        results["kl"] = self.kl(harmless, edit)
        results["n_harmful"], results["n_harmless"] = len(harmful), len(harmless)
        return results, samples
