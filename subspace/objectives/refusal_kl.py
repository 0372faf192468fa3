"""The combined objective's settings, and how it finds the tokens that open a refusal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from subspace.evaluation.evaluator import Evaluator


@dataclass
class RefusalKLObjective:
    """`loss = refusal_loss(harmful) + kl_weight · KL(P_original ‖ P_edited)(harmless)`."""

    kl_weight: float = 1.0
    refusal: str = "first_token"
    probe_prompts: int = 64
    probe_new_tokens: int = 8

    def __post_init__(self) -> None:
        if self.kl_weight < 0:
            raise ValueError(f"objective.kl_weight={self.kl_weight} must be ≥ 0 (it weighs the KL term)")
        if self.refusal != "first_token":
            raise ValueError(f"objective.refusal={self.refusal!r} is not supported; valid: 'first_token'")

    def refusal_token_ids(self, evaluator: Evaluator, harmful: Sequence[str]) -> torch.Tensor:
        """First tokens of the model's own refusals on training prompts: the mass the loss pushes down."""
        prompts = list(harmful[: self.probe_prompts])
        _, texts, flags = evaluator.refusals(prompts, None, "probing refusals", self.probe_new_tokens)
        tokenizer = evaluator.bundle.tokenizer
        ids = {tokenizer(t, add_special_tokens=False)["input_ids"][0] for t, f in zip(texts, flags) if f and t}
        if not ids:
            raise ValueError(f"the model refused none of {len(prompts)} training harmful prompts "
                             f"({texts[:2]!r}...): there is no refusal to remove")
        return torch.tensor(sorted(ids))
