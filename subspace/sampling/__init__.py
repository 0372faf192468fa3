"""Samplers that a family's `generate` uses when the model's own is not `model.generate`."""

from subspace.sampling.masked_diffusion import MaskedDiffusionSampler

__all__ = ["MaskedDiffusionSampler"]
