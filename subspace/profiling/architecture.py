"""A model of a real architecture with random weights: on `meta` (no memory) to count, on a device to time."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from hydra.utils import get_class, instantiate
from transformers import PretrainedConfig, PreTrainedModel

from subspace.models.bundle import resolve_dtype


def architecture_config(spec: Mapping[str, Any], layers: int | None = None) -> PretrainedConfig:
    """The architecture's config (`spec.config`, a Hydra node), truncated to `layers` decoder layers if given.

    Multimodal configs (DiffusionGemma) nest the decoder's shape in a text config: that one is truncated, and its
    `layer_types` with it."""
    config = instantiate(spec["config"], _convert_="all")  # plain lists and dicts for strict config classes
    text = config.get_text_config()
    full = text.num_hidden_layers
    if layers is not None:
        if not 0 < layers <= full:
            raise ValueError(f"layers={layers} must be in 1..{full} (the architecture's num_hidden_layers)")
        text.num_hidden_layers = layers
        if isinstance(getattr(text, "layer_types", None), list):
            text.layer_types = text.layer_types[:layers]
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
    """Parameters in total, in the decoder layers, and elsewhere (embeddings, LM head, final norm; a vision tower).

    A tensor reached under several names (DiffusionGemma's encoder and decoder run one set of layer tensors, the LM
    head is the embedding) counts once: `parameters()` yields each `Parameter` object once, by identity, which also
    holds on `meta` (where every data_ptr is 0). Where names alias, `aliased_names` says how many; where there is a
    vision tower, `of_which_vision` its share of `embeddings_head_norm`; for fused experts, `active_per_token`:
    the text model with only top-k of every layer's expert tensors.
    """
    total = sum(p.numel() for p in model.parameters())
    in_layers = sum(p.numel() for p in layers.parameters())
    counts = {"total": total, "decoder_layers": in_layers, "embeddings_head_norm": total - in_layers}
    aliased = sum(1 for _ in model.named_parameters(remove_duplicate=False)) - sum(1 for _ in model.parameters())
    if aliased:
        counts["aliased_names"] = aliased
    vision = {id(p): p.numel() for name, module in model.named_modules()
              if name.rsplit(".", 1)[-1] in ("vision_tower", "embed_vision") for p in module.parameters()}
    if vision:
        counts["of_which_vision"] = sum(vision.values())
    text = model.config.get_text_config()
    experts = getattr(text, "num_experts", None)
    top_k = getattr(text, "top_k_experts", None) or getattr(text, "num_experts_per_tok", None)
    if experts and top_k:
        stacked = sum(p.numel() for p in layers.parameters() if p.dim() == 3 and p.shape[0] == experts)
        counts["active_per_token"] = total - sum(vision.values()) - stacked + stacked * top_k // experts
    return counts
