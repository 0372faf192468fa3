"""Before/after evaluation of an edit: three-way verdicts on the model's own samples, first-token and response KL."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor

from subspace.evaluation.generation import generate_responses, generate_token_ids
from subspace.evaluation.judges import VERDICTS, Judge, MarkerJudge
from subspace.evaluation.metrics import ResponseKL, VerdictRates
from subspace.families import family_for
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
    judge: Judge = MarkerJudge()
    max_new_tokens: int | None = None  # None: the family's default (96 tokens; a masked-diffusion model's canvas)
    batch_size: int = 16
    system_prompt: str | None = None
    progress: bool = True
    apply: str = "hooks"
    kl_response_tokens: int = 16  # kl_response: over the first N tokens of the unedited model's own answers
    on_select: bool = True  # also measure the edit on the held-back selection split (what sweeps optimise; conf/eval:
    # in sweeps only)

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

    def token_ids(self, prompts: Sequence[str], max_new_tokens: int | None = None, desc: str = "generating") -> list[list[int]]:
        """The unedited model's sampled token ids per prompt (stop token and after removed)."""
        return generate_token_ids(self.family, self.bundle.tokenizer, prompts,
                                  max_new_tokens=max_new_tokens or self.max_new_tokens, batch_size=self.batch_size,
                                  system_prompt=self.system_prompt, desc=desc, progress=self.progress)

    def probe(self, prompts: Sequence[str], max_new_tokens: int, desc: str = "probing"
              ) -> tuple[list[list[int]], list[str], list[str]]:
        """(sampled token ids, their stripped texts, verdicts) of the unedited model: what the objective reads
        its refusal tokens from (the ids it emitted; re-tokenising the text can give others)."""
        ids = self.token_ids(prompts, max_new_tokens, desc)
        texts = [t.strip() for t in self.bundle.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return ids, texts, self.judge.verdicts(prompts, texts)

    def judged(self, prompts: Sequence[str], edit: ProjectionEdit | None = None, desc: str = "generating",
               max_new_tokens: int | None = None) -> tuple[list[str], list[str]]:
        """(responses, verdicts): each response judged `refusal`, `answer` or `broken`."""
        texts = self.responses(prompts, edit, desc, max_new_tokens)
        return texts, self.judge.verdicts(prompts, texts)

    def refusals(self, prompts: Sequence[str], edit: ProjectionEdit | None = None, desc: str = "generating",
                 max_new_tokens: int | None = None) -> tuple[float, list[str], list[bool]]:
        """(refusal rate, responses, per-prompt refusal flags)."""
        texts, verdicts = self.judged(prompts, edit, desc, max_new_tokens)
        flags = [v == "refusal" for v in verdicts]
        return sum(flags) / max(len(flags), 1), texts, flags

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

    @torch.no_grad()
    def kl_response(self, prompts: Sequence[str], answers: Sequence[str], edit: ProjectionEdit) -> float:
        """Mean KL(P_original ‖ P_edited) over the first `kl_response_tokens` tokens of the unedited model's own
        `answers`, teacher-forced (`family.kl_response_at`): damage after the first token, which the first-token KL
        cannot see. Original and edited distributions are computed batch by batch, so nothing vocabulary-sized is kept."""
        tokenizer, n = self.bundle.tokenizer, self.kl_response_tokens
        total, count = 0.0, 0
        for i in range(0, len(prompts), self.batch_size):
            batch = self.family.chat_batch(tokenizer, prompts[i: i + self.batch_size], self.system_prompt)
            ids = [self._answer_tokens(a) for a in answers[i: i + self.batch_size]]
            answer = torch.full((len(ids), n), -1, dtype=torch.long)
            for j, row in enumerate(ids):
                answer[j, : len(row)] = torch.tensor(row, dtype=torch.long)
            reference, valid = self.family.answer_logprobs(batch, answer)
            with self._edited(edit):
                edited, _ = self.family.answer_logprobs(batch, answer)
            per_position = (reference.exp() * (reference - edited)).sum(-1)
            total += float(per_position[valid].double().sum())
            count += int(valid.sum())
        return total / max(count, 1)

    def _answer_tokens(self, answer: str) -> list[int]:
        """An answer's first `kl_response_tokens` tokens; one that ended sooner keeps its end token (where it stopped
        is part of what it said, and an empty answer is all end)."""
        tokenizer, n = self.bundle.tokenizer, self.kl_response_tokens
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"][:n]
        return ids + [tokenizer.eos_token_id] if len(ids) < n and tokenizer.eos_token_id is not None else ids

    def before_after(self, harmful: Sequence[str], harmless: Sequence[str], edit: ProjectionEdit,
                     categories: dict[str, Sequence[str | None]] | None = None) -> tuple[dict, list[dict]]:
        """The report metrics (before and after measured in the same run) and per-prompt samples.

        Per split and state: `answer_rate`, `refusal_rate`, `broken_rate` (three-way verdicts of `judge`; harmless
        keys start with `harmless_`), the marker judge's refusal rate beside them (`marker_refusal_rate`), and, where
        `categories` gives a category per prompt, the same rates per category. Damage: `kl` (first response
        position or first canvas positions) and `kl_response` (the first N tokens of the unedited model's answers).
        """
        results, samples, marker = {}, [], MarkerJudge()
        for split, prompts in (("harmful", harmful), ("harmless", harmless)):
            prefix = "" if split == "harmful" else "harmless_"
            cats = list((categories or {}).get(split) or [None] * len(prompts))
            texts, verdicts = {}, {}
            for state, e in (("before", None), ("after", edit)):
                texts[state], verdicts[state] = self.judged(prompts, e, f"{split} {state}")
                for verdict, rate in verdict_rates(verdicts[state]).items():
                    results[f"{prefix}{verdict}_rate_{state}"] = rate
                results[f"{prefix}marker_refusal_rate_{state}"] = (
                    sum(v == "refusal" for v in marker.verdicts(prompts, texts[state])) / max(len(prompts), 1))
            if any(c is not None for c in cats):
                results[f"{prefix}by_category"] = by_category(cats, verdicts)
            samples += [{"split": split, "prompt": p, "category": c, "before": b, "after": a,
                         "verdict_before": vb, "verdict_after": va,
                         "refused_before": vb == "refusal", "refused_after": va == "refusal"}
                        for p, c, b, a, vb, va in zip(prompts, cats, texts["before"], texts["after"],
                                                       verdicts["before"], verdicts["after"])]
            if split == "harmless":
                results["kl_response"] = self.kl_response(prompts, texts["before"], edit)
        results["kl"] = self.kl(harmless, edit)
        results["n_harmful"], results["n_harmless"] = len(harmful), len(harmless)
        results["kl_response_tokens"], results["kl_response_at"] = self.kl_response_tokens, self.family.kl_response_at
        results["judge"] = describe_judge(self.judge)
        results["max_new_tokens"] = self.max_new_tokens
        return results, samples


def verdict_rates(verdicts: Sequence[str]) -> dict[str, float]:
    metric = VerdictRates()
    metric.update(verdicts)
    return {v: float(r) for v, r in zip(VERDICTS, metric.compute())}


def by_category(categories: Sequence[str | None], verdicts: dict[str, list[str]]) -> dict[str, dict]:
    """{category: {n, answer_rate_before, ..., broken_rate_after}} over the prompts that carry a category."""
    out = {}
    for cat in sorted({c for c in categories if c is not None}):
        index = [i for i, c in enumerate(categories) if c == cat]
        out[cat] = {"n": len(index)} | {f"{v}_rate_{state}": r for state, vs in verdicts.items()
                                        for v, r in verdict_rates([vs[i] for i in index]).items()}
    return out


def describe_judge(judge: Judge) -> str:
    path = getattr(judge, "path", None)
    return type(judge).__name__ + (f" ({path.name})" if path is not None else "")


def build_evaluator(cfg: DictConfig, bundle: ModelBundle, **overrides) -> Evaluator:
    """The evaluator `cfg.eval` describes, for the loaded `bundle` and its family: the one way train.py and every
    script build it. `overrides` replace config values (a script that must evaluate merged weights: apply="merged")."""
    family = family_for(bundle.model, cfg.long_prompts, **bundle.family_options)
    return instantiate(cfg.eval, **overrides)(bundle=bundle, family=family)
