"""Family adapters: the only place that knows an architecture's module names, positions and sampler."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel

from subspace.families.base import SITE_KINDS, WRITER_KINDS, Family, WriterSite
from subspace.families.causal import CausalFamily
from subspace.families.diffusion_gemma import DiffusionGemmaFamily
from subspace.families.llada import LLaDAFamily


def family_for(model: PreTrainedModel, long_prompts: str = "truncate", **options: Any) -> Family:
    """The adapter for a loaded model; `options` are the family's settings from the model config, `long_prompts`
    what its chat batches do with a prompt over the token limit ("truncate" with a warning, or "error").

    LLaDA is recognised by its config's model_type, so the published remote code (same module names) works too;
    DiffusionGemma (encoder and decoder sharing their layers) by its model_type "diffusion_gemma".
    """
    model_type = getattr(model.config, "model_type", None)
    if model_type == "llada":
        return LLaDAFamily(model, long_prompts=long_prompts, **options)
    if model_type == "diffusion_gemma":
        return DiffusionGemmaFamily(model, long_prompts=long_prompts, **options)
    if options:
        raise ValueError(f"family options {sorted(options)} are only for diffusion models, not {type(model).__name__}")
    return CausalFamily(model, long_prompts)


__all__ = ["SITE_KINDS", "WRITER_KINDS", "CausalFamily", "DiffusionGemmaFamily", "Family", "LLaDAFamily", "WriterSite",
           "family_for"]
