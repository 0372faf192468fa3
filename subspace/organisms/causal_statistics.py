"""Activation statistics of a causal Llama, for starting a post-norm, q/k-normed architecture (DiffusionGemma) as it.

DiffusionGemma RMS-normalises every sub-layer's output (post-norms), every head's queries and keys (q/k norms, with
attention scaling 1) and its values. Copied weights alone would give each sub-layer's output unit RMS and each
attention logit the wrong temperature, so the warm start sets those norms' scales from what the causal model
produces on the text it will be trained on. Sub-layer outputs: the median per-token RMS, not the mean (a few
tokens, the first "attention sink" ones, carry activations orders of magnitude larger; the mean, or a per-channel
least-squares fit, follows them and wrecks the rest). Queries and keys: a per-channel least-squares fit.
Measured on the SmolLM2 organism: no choice of norm scales brings back Llama's per-token magnitudes, and the
warm-started encoder agrees with the causal organism's next token ~20% of the time (KL ~4 nats): a start, not a copy.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel


@dataclass
class CausalStatistics:
    """Per layer, over real (unpadded) calibration tokens; `keys`/`values` only for `kv_layer`."""

    attn_rms: list[float]  # median per-token RMS of the attention sub-layer's output (o_proj)
    mlp_rms: list[float]  # median per-token RMS of the MLP's output (down_proj)
    q_scale: list[Tensor]  # [head_dim]: least-squares per-channel scale of a head's RMS-normalised query (pre-RoPE)
    k_scale: list[Tensor]  # the same for keys
    embed_rms: float  # median RMS of an embedding row
    kv_layer: int
    keys: Tensor  # [tokens, kv_heads, head_dim]: k_proj outputs at kv_layer
    values: Tensor  # [tokens, kv_heads, head_dim]: v_proj outputs at kv_layer


def _rms(x: Tensor) -> Tensor:
    return x.float().pow(2).mean(-1).sqrt()


@torch.no_grad()
def causal_statistics(model: PreTrainedModel, sequences: Sequence[Tensor], batch_size: int = 8,
                      kv_layer: int = -1) -> CausalStatistics:
    """Run `sequences` (token id vectors) through the causal model and record its activation scales."""
    layers = model.model.layers
    kv_layer = kv_layer % len(layers)
    head_dim = model.config.head_dim
    seen: dict[str, list[Tensor]] = {}
    real: list[Tensor] = []  # the current batch's real-token mask, read by the hooks

    def record(name: str):
        def hook(module: nn.Module, args, output: Tensor) -> None:
            seen.setdefault(name, []).append(output[real[-1]].float())
        return hook

    with ExitStack() as stack:
        for i, layer in enumerate(layers):
            modules = {"attn": layer.self_attn.o_proj, "mlp": layer.mlp.down_proj, "q": layer.self_attn.q_proj,
                       "k": layer.self_attn.k_proj}
            if i == kv_layer:
                modules["v"] = layer.self_attn.v_proj
            for kind, module in modules.items():
                handle = module.register_forward_hook(record(f"{kind}{i}"))
                stack.callback(handle.remove)
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start: start + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.bool)
            for row, seq in enumerate(chunk):
                ids[row, : len(seq)], mask[row, : len(seq)] = seq, True
            real.append(mask.to(model.device))
            model(input_ids=ids.to(model.device), attention_mask=mask.long().to(model.device), use_cache=False)

    def cat(name: str) -> Tensor:
        return torch.cat(seen[name])

    def median(name: str) -> float:
        return float(_rms(cat(name)).median())

    def channel_scale(name: str) -> Tensor:
        """w minimising E‖w ⊙ x̂ − x‖² over heads and tokens, x̂ = x / RMS(x): per channel E[RMS·x̂²] / E[x̂²]."""
        x = cat(name).view(-1, head_dim)
        r = _rms(x)[:, None]
        unit = (x / r).pow(2)
        return (r * unit).sum(0) / unit.sum(0)

    n = len(layers)
    return CausalStatistics(
        attn_rms=[median(f"attn{i}") for i in range(n)], mlp_rms=[median(f"mlp{i}") for i in range(n)],
        q_scale=[channel_scale(f"q{i}") for i in range(n)], k_scale=[channel_scale(f"k{i}") for i in range(n)],
        embed_rms=float(_rms(model.get_input_embeddings().weight).median()), kv_layer=kv_layer,
        keys=cat(f"k{kv_layer}").view(-1, model.config.num_key_value_heads, head_dim),
        values=cat(f"v{kv_layer}").view(-1, model.config.num_key_value_heads, head_dim))
