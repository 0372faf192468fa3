"""Refusal and KL terms on float32 log-probabilities from a family's `response_logprobs`."""

from __future__ import annotations

import torch
from torch import Tensor


def refusal_loss(logprobs: Tensor, refusal_token_ids: Tensor) -> Tensor:
    """−log(1 − p_refuse), p_refuse the mass on tokens that open the model's refusals, averaged over prompts
    and response positions.

    `logprobs` [batch, vocab] (one position) or [batch, positions, vocab]; `refusal_token_ids` [M] (one
    position) or [positions, M], each row the refusal tokens at that position, padded with −1. It is
    ≈ p_refuse when refusals are rare and grows without bound as they become certain, so the gradient
    is strongest exactly on the prompts still refused.
    """
    if logprobs.ndim == 2:
        logprobs = logprobs.unsqueeze(1)
    ids = refusal_token_ids.reshape(-1, refusal_token_ids.shape[-1])
    positions = ids.shape[0]
    chosen = logprobs[:, :positions].gather(-1, ids.clamp(min=0).expand(logprobs.shape[0], -1, -1))
    log_p_refuse = torch.logsumexp(chosen.masked_fill(ids < 0, -torch.inf), dim=-1)
    return -torch.log1p(-log_p_refuse.exp().clamp(max=1 - 1e-6)).mean()


def kl_divergence(reference_logprobs: Tensor, logprobs: Tensor) -> Tensor:
    """Mean over batch (and positions) of KL(P_original ‖ P_edited), both float32 log-probabilities [..., vocab]."""
    return (reference_logprobs.exp() * (reference_logprobs - logprobs)).sum(-1).mean()
