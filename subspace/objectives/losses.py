"""Refusal and KL terms at the first response position, in float32 whatever the model's dtype."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def first_token_logprobs(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """log P(first response token | prompt): [batch, vocab] float32 (log-softmax, never log of softmax)."""
    logits = model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1, :]
    return torch.log_softmax(logits.float(), dim=-1)


def refusal_loss(logprobs: Tensor, refusal_token_ids: Tensor) -> Tensor:
    """−log(1 − p_refuse), where p_refuse is the mass on tokens that open the model's refusals.

    It is ≈ p_refuse when refusals are rare and grows without bound as they become certain,
    so the gradient is strongest exactly on the prompts still refused.
    """
    log_p_refuse = torch.logsumexp(logprobs[:, refusal_token_ids], dim=-1)
    return -torch.log1p(-log_p_refuse.exp().clamp(max=1 - 1e-6)).mean()


def kl_divergence(reference_logprobs: Tensor, logprobs: Tensor) -> Tensor:
    """Mean over the batch of KL(P_original ‖ P_edited), both given as float32 log-probabilities."""
    return (reference_logprobs.exp() * (reference_logprobs - logprobs)).sum(-1).mean()
