"""Refusal and KL terms on float32 log-probabilities from a family's `response_logprobs`."""

from __future__ import annotations

import torch
from torch import Tensor


def refusal_loss(logprobs: Tensor, refusal_token_ids: Tensor) -> Tensor:
    """−log(1 − p_refuse), p_refuse the mass on tokens that open the model's refusals ([batch, vocab] log-probs
    at the first response position).

    It is ≈ p_refuse when refusals are rare and grows without bound as they become certain,
    so the gradient is strongest exactly on the prompts still refused.
    """
    log_p_refuse = torch.logsumexp(logprobs[:, refusal_token_ids], dim=-1)
    return -torch.log1p(-log_p_refuse.exp().clamp(max=1 - 1e-6)).mean()


def kl_divergence(reference_logprobs: Tensor, logprobs: Tensor) -> Tensor:
    """Mean over batch (and positions) of KL(P_original ‖ P_edited), both float32 log-probabilities [..., vocab]."""
    return (reference_logprobs.exp() * (reference_logprobs - logprobs)).sum(-1).mean()
