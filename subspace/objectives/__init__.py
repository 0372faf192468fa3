"""Loss terms: how much the edited model still refuses, and how far it moved on harmless prompts."""

from subspace.objectives.losses import first_token_logprobs, kl_divergence, refusal_loss

__all__ = ["first_token_logprobs", "kl_divergence", "refusal_loss"]
