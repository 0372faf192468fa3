"""A model of a real architecture with random weights: on `meta` (no memory) to count, on a device to time."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from hydra.utils import get_class, instantiate
from transformers import PretrainedConfig, PreTrainedModel

from subspace.models.bundle import resolve_dtype


def architecture_config(spec: Mapping[str, Any], layers: int | None = None) -> PretrainedConfig:
    """The architecture's config (`spec.config`, a Hydra node), truncated to `layers` decoder layers if given."""
    config = instantiate(spec["config"], _convert_="all")  # plain lists and dicts for strict config classes
    full = config.num_hidden_layers
    if layers is not None:
        if not 0 < layers <= full:
            raise ValueError(f"layers={layers} must be in 1..{full} (the architecture's num_hidden_layers)")
        config.num_hidden_layers = layers
    return config


def random_model(spec: Mapping[str, Any], config: PretrainedConfig, dtype: str, device: str | torch.device,
                 seed: int = 0) -> PreTrainedModel:
    """`spec.model_class` built from `config` straight on `device` in `dtype` (no float32 copy on the way)."""
    cls = get_class(spec["model_class"])
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls._from_config(config, dtype=resolve_dtype(dtype))
    return model.eval().requires_grad_(False)


def count_parameters(model: torch.nn.Module, layers: torch.nn.ModuleList) -> dict[str, int]:
    """Parameters in total, in the decoder layers, and elsewhere (embeddings, LM head, final norm)."""
    total = sum(p.numel() for p in model.parameters())
    in_layers = sum(p.numel() for p in layers.parameters())
    return {"total": total, "decoder_layers": in_layers, "embeddings_head_norm": total - in_layers}
