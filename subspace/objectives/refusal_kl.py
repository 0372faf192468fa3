"""The combined objective's settings, and how it finds the tokens that open a refusal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from subspace.evaluation.evaluator import Evaluator
from subspace.objectives.reference import check_top_k


@dataclass
class RefusalKLObjective:
    """`loss = refusal_loss(harmful) + kl_weight · KL(P_original ‖ P_edited)(harmless)`, both at the family's
    response positions (the first response token; the first canvas positions for masked diffusion).

    `kl_top_k`: null caches the original distributions over the full vocabulary (the KL is exact); K caches only
    each position's K most likely tokens and the pooled rest, ≈ vocab / 2K times less memory, and the KL is the
    one between the K+1-bin coarsenings (≤ the exact KL). K ≥ vocab caches the full vocabulary, as null does.
    """

    kl_weight: float = 1.0
    refusal: str = "first_token"
    probe_prompts: int = 64
    probe_new_tokens: int = 8
    kl_top_k: int | None = None

    def __post_init__(self) -> None:
        if self.kl_weight < 0:
            raise ValueError(f"objective.kl_weight={self.kl_weight} must be ≥ 0 (it weighs the KL term)")
        if self.refusal != "first_token":
            raise ValueError(f"objective.refusal={self.refusal!r} is not supported; valid: 'first_token'")
        check_top_k(self.kl_top_k)

    def refusal_token_ids(self, evaluator: Evaluator, harmful: Sequence[str]) -> torch.Tensor:
        """Tokens that open the model's own refusals on training prompts: the mass the loss pushes down.

        One position (causal): the first tokens, [M]. A family that reads several response positions
        (masked diffusion, whose sampler may commit any of them first): the j-th tokens at position j,
        [positions, M] padded with −1.
        """
        prompts = list(harmful[: self.probe_prompts])
        _, texts, flags = evaluator.refusals(prompts, None, "probing refusals", self.probe_new_tokens)
        tokenizer = evaluator.bundle.tokenizer
        refusals = [tokenizer(t, add_special_tokens=False)["input_ids"] for t, f in zip(texts, flags) if f and t]
        if not refusals:
            raise ValueError(f"the model refused none of {len(prompts)} training harmful prompts "
                             f"({texts[:2]!r}...): there is no refusal to remove")
        positions = evaluator.family.response_positions
        at = [sorted({ids[j] for ids in refusals if len(ids) > j}) for j in range(positions)]
        if positions == 1:
            return torch.tensor(at[0])
        width = max(len(ids) for ids in at)
        return torch.tensor([ids + [-1] * (width - len(ids)) for ids in at])
