"""The combined objective's settings, and how it finds the tokens that open a refusal."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from subspace.families.base import Family
from subspace.objectives.reference import check_top_k

REFUSAL_TERMS = ("first_token", "prefix")


class RefusalProbe(Protocol):
    """What finding the refusal tokens needs from an evaluator: the family, and judged samples of the unedited model."""

    family: Family

    def probe(self, prompts: Sequence[str], max_new_tokens: int, desc: str
              ) -> tuple[list[list[int]], list[str], list[str]]:
        """(sampled token ids, their stripped texts, each text's verdict) per prompt."""


@dataclass
class RefusalKLObjective:
    """`loss = refusal_loss(harmful) + kl_weight · KL(P_original ‖ P_edited)(harmless)`, both at the family's
    response positions (the first response token; the first canvas positions for masked diffusion).

    `refusal`: `first_token` scores the tokens that open the model's refusals at the response position(s);
    `prefix` (causal families) scores the `prefix_tokens`-token openings of its refusals, teacher-forced, the
    `max_prefixes` most common ones: where every refusal opens with a word answers also open with ("I"), the
    first token cannot tell them apart and lowering it costs KL on harmless prompts; the prefix can.

    `kl_top_k`: null caches the original distributions over the full vocabulary (the KL is exact); K caches only
    each position's K most likely tokens and the pooled rest, ≈ vocab / 2K times less memory, and the KL is the
    one between the K+1-bin coarsenings (≤ the exact KL). K ≥ vocab caches the full vocabulary, as null does.
    """

    kl_weight: float = 1.0
    refusal: str = "first_token"
    probe_prompts: int = 64
    probe_new_tokens: int = 8
    kl_top_k: int | None = None
    prefix_tokens: int = 3
    max_prefixes: int = 8

    def __post_init__(self) -> None:
        if self.kl_weight < 0:
            raise ValueError(f"objective.kl_weight={self.kl_weight} must be ≥ 0 (it weighs the KL term)")
        if self.refusal not in REFUSAL_TERMS:
            raise ValueError(f"objective.refusal={self.refusal!r} is not supported; valid: {', '.join(REFUSAL_TERMS)}")
        if not 1 <= self.prefix_tokens <= self.probe_new_tokens:
            raise ValueError(f"objective.prefix_tokens={self.prefix_tokens} must be in [1, objective.probe_new_tokens="
                             f"{self.probe_new_tokens}] (a prefix is read from the probed responses)")
        if self.max_prefixes < 1:
            raise ValueError(f"objective.max_prefixes={self.max_prefixes} must be ≥ 1")
        check_top_k(self.kl_top_k)

    def refusal_token_ids(self, evaluator: RefusalProbe, harmful: Sequence[str]) -> torch.Tensor:
        """Tokens that open the model's own refusals on training prompts: the mass the loss pushes down.

        One position (causal): the first tokens, [M]. A family that reads several response positions
        (masked diffusion, whose sampler may commit any of them first): the j-th tokens at position j,
        [positions, M] padded with −1. `refusal=prefix`: the most common refusal openings, [R, prefix_tokens].
        """
        if self.refusal == "prefix" and not evaluator.family.reads_prefixes:
            raise ValueError(f"objective.refusal=prefix needs a family whose response is read left to right; the "
                             f"{evaluator.family.name} family's is not: use objective.refusal=first_token")
        prompts = list(harmful[: self.probe_prompts])
        ids, texts, verdicts = evaluator.probe(prompts, self.probe_new_tokens, "probing refusals")
        # the ids the model emitted: re-tokenising the text can give others (a leading space, a merge)
        refusals = [row for row, t, v in zip(ids, texts, verdicts) if v == "refusal" and t]
        if not refusals:
            raise ValueError(f"the model refused none of {len(prompts)} training harmful prompts "
                             f"({texts[:2]!r}...): there is no refusal to remove")
        if self.refusal == "prefix":
            return self.most_common_prefixes(refusals, texts)
        positions = evaluator.family.response_positions
        at = [sorted({ids[j] for ids in refusals if len(ids) > j}) for j in range(positions)]
        if positions == 1:
            return torch.tensor(at[0])
        width = max(len(ids) for ids in at)
        return torch.tensor([ids + [-1] * (width - len(ids)) for ids in at])

    def most_common_prefixes(self, refusals: list[list[int]], texts: Sequence[str]) -> torch.Tensor:
        """The `max_prefixes` most common `prefix_tokens`-token openings of the refusals: [R, prefix_tokens]."""
        counts = Counter(tuple(ids[: self.prefix_tokens]) for ids in refusals if len(ids) >= self.prefix_tokens)
        if not counts:
            raise ValueError(f"no probed refusal has objective.prefix_tokens={self.prefix_tokens} tokens "
                             f"({texts[:2]!r}...): lower it")
        return torch.tensor([list(p) for p, _ in counts.most_common(self.max_prefixes)])
