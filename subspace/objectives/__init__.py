"""Loss terms: how much the edited model still refuses, and how far it moved on harmless prompts."""

from subspace.objectives.losses import coarse_kl_divergence, kl_divergence, prefix_refusal_loss, refusal_loss
from subspace.objectives.reference import ReferenceDistributions

__all__ = ["ReferenceDistributions", "coarse_kl_divergence", "kl_divergence", "prefix_refusal_loss",
           "refusal_loss"]
