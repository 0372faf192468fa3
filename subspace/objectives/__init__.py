"""Loss terms: how much the edited model still refuses, and how far it moved on harmless prompts."""

from subspace.objectives.losses import kl_divergence, refusal_loss

__all__ = ["kl_divergence", "refusal_loss"]
