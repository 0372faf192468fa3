"""Loading models: pretrained checkpoints, the shipped GGUF, and cached model organisms."""

from subspace.models.bundle import ModelBundle

__all__ = ["ModelBundle"]
