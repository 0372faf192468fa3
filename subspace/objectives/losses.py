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
    return refusal_penalty(torch.logsumexp(chosen.masked_fill(ids < 0, -torch.inf), dim=-1))


def prefix_refusal_loss(prefix_logprobs: Tensor) -> Tensor:
    """−log(1 − p_refuse), p_refuse the summed probability of the refusal prefixes, averaged over prompts.

    `prefix_logprobs` [batch, R]: log P(prefix r | prompt) of each of R distinct refusal prefixes of one length
    (distinct sequences of one length are disjoint events, so their probabilities add). Unlike the first token
    alone ("I", which also opens many answers), a prefix such as "I'm sorry" or "I cannot" is a refusal, so the
    edit can lower it at the token that makes it one.
    """
    return refusal_penalty(prefix_logprobs.logsumexp(-1))


def refusal_penalty(log_p_refuse: Tensor) -> Tensor:
    """−log(1 − p) averaged: ≈ p when refusals are rare, unbounded as they become certain."""
    return -torch.log1p(-log_p_refuse.exp().clamp(max=1 - 1e-6)).mean()


def kl_divergence(reference_logprobs: Tensor, logprobs: Tensor) -> Tensor:
    """Mean over batch (and positions) of KL(P_original ‖ P_edited), both float32 log-probabilities [..., vocab]."""
    return (reference_logprobs.exp() * (reference_logprobs - logprobs)).sum(-1).mean()


def remainder_logprob(logprobs: Tensor, ids: Tensor) -> Tensor:
    """log of the mass outside the tokens `ids` [..., K], from log-probabilities [..., vocab]: [...].

    A logsumexp over the other tokens, so it stays exact when the kept tokens hold nearly all the mass (where
    log(1 − Σ p) cancels to nothing in float32). The kept tokens are filled with the most negative finite float,
    not −inf, so that an empty remainder (K = vocab) gives a finite log and no NaN gradient.
    """
    return logprobs.scatter(-1, ids.long(), torch.finfo(logprobs.dtype).min).logsumexp(-1)


def coarse_kl_divergence(top_logprobs: Tensor, ids: Tensor, rest_logprob: Tensor, logprobs: Tensor) -> Tensor:
    """`kl_divergence` between P and Q both coarsened to K+1 bins: P's top-K tokens, and the rest pooled.

    P is given compactly (`top_logprobs` and `ids` [..., K], `rest_logprob` [...]: log of P's remaining mass),
    Q in full [..., vocab]. Pooling can only lose information, so this is ≤ the full KL (data processing
    inequality), with equality for K = vocab. The gap is p_rest · KL between P and Q renormalised over the pooled
    tokens (chain rule), so it is small when P is peaked and K holds most of its mass.
    """
    kept = torch.cat([top_logprobs, rest_logprob.unsqueeze(-1)], -1)
    edited = torch.cat([logprobs.gather(-1, ids.long()), remainder_logprob(logprobs, ids).unsqueeze(-1)], -1)
    return kl_divergence(kept, edited)
