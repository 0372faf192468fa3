"""Decoder-only (causal) transformers: Llama, Qwen, Mistral, Gemma, SmolLM2 and kin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Relative names of the matrices that write into the residual stream, per layer.
ATTENTION_WRITERS = ("self_attn.o_proj", "attn.o_proj", "self_attn.out_proj", "attn.c_proj")
MLP_WRITERS = ("mlp.down_proj", "mlp.fc2", "mlp.c_proj", "feed_forward.w2")


@dataclass(frozen=True)
class WriterSite:
    """A matrix whose output is added to the residual stream after decoder layer `layer`."""

    name: str
    layer: int
    kind: str  # "attn_out" | "mlp_out"


def _get(module: nn.Module, dotted: str) -> nn.Module | None:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


class CausalFamily:
    """Finds decoder layers and residual writers, builds chat batches, reads the residual stream."""

    name = "causal"

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.layers_path, self.layers = self._find_layers(model)
        self.hidden_size: int = model.config.hidden_size
        self.num_layers = len(self.layers)

    @staticmethod
    def _find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
        for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
            layers = _get(model, path)
            if isinstance(layers, nn.ModuleList):
                return path, layers
        raise TypeError(
            f"{type(model).__name__} has no decoder layer list at model.layers, "
            "model.decoder.layers, transformer.h or gpt_neox.layers; add a family adapter for it."
        )

    def check_layer(self, layer: int, what: str = "layer") -> int:
        if not -self.num_layers <= layer < self.num_layers:
            raise ValueError(
                f"{what}={layer} is out of range: this model has {self.num_layers} decoder layers, "
                f"valid indices are 0..{self.num_layers - 1} (or negative from the end)."
            )
        return layer % self.num_layers

    def writer_sites(self, layers: Sequence[int] | None = None, kinds: Sequence[str] = ("attn_out", "mlp_out")) -> list[WriterSite]:
        """Every residual writer in the chosen layers, in forward order."""
        chosen = range(self.num_layers) if layers is None else [self.check_layer(i) for i in layers]
        sites: list[WriterSite] = []
        for i in chosen:
            for kind, candidates in (("attn_out", ATTENTION_WRITERS), ("mlp_out", MLP_WRITERS)):
                if kind not in kinds:
                    continue
                rel = next((c for c in candidates if isinstance(_get(self.layers[i], c), nn.Linear)), None)
                if rel is None:
                    raise TypeError(f"layer {i} of {type(self.model).__name__} has no {kind} Linear among {candidates}")
                sites.append(WriterSite(f"{self.layers_path}.{i}.{rel}", i, kind))
        return sites

    def chat_batch(self, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], system_prompt: str | None = None,
                   max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Left-padded chat-templated prompts ending at the first response position, on the model's device."""
        if tokenizer.chat_template is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template; set one (tokenizer.chat_template) "
                             "or use an instruct model.")
        if tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad token; set tokenizer.pad_token.")
        texts = [tokenizer.apply_chat_template(self.messages(p, system_prompt), tokenize=False, add_generation_prompt=True)
                 for p in prompts]
        tokenizer.padding_side = "left"
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False,
                          truncation=max_length is not None, max_length=max_length)
        return {k: v.to(self.model.device) for k, v in batch.items()}

    @staticmethod
    def messages(prompt: str, system_prompt: str | None) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return msgs + [{"role": "user", "content": prompt}]

    @torch.no_grad()
    def residual_at_last_token(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Residual stream entering each layer at the last prompt token: [num_layers, batch, d], float32."""
        out = self.model(**batch, output_hidden_states=True, use_cache=False)
        return torch.stack([h[:, -1, :].float() for h in out.hidden_states[: self.num_layers]])


def family_for(model: PreTrainedModel) -> CausalFamily:
    """The family adapter for a loaded model (later families register here)."""
    return CausalFamily(model)
