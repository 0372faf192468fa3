"""Memory estimates per component, from the config alone (so they also hold for sizes that do not fit here)."""

from __future__ import annotations

from transformers import PretrainedConfig

from subspace.objectives.reference import ReferenceDistributions

GIB = 1024 ** 3


def activation_bytes_per_token_layer(config: PretrainedConfig, dtype_bytes: int) -> int:
    """Rough upper bound of what autograd keeps per token and decoder layer in a Llama-style block.

    In the model dtype: the block input, q/k/v, the attention output and the writer inputs (≈ 6·d)
    and the gate/up/activation/product tensors of the MLP (4·f); in float32: the two norms'
    normalised copies, rotary's q/k and the projection hooks' float32 copies of both writer outputs (≈ 8·d).
    """
    return config.hidden_size * (6 * dtype_bytes + 8 * 4) + 4 * mlp_width_per_token(config) * dtype_bytes


def mlp_width_per_token(config: PretrainedConfig) -> int:
    """Intermediate width a token runs through: the dense MLP's, or top-k experts' for a mixture of experts, or both
    where every layer runs a dense MLP beside its experts (Gemma-4 / DiffusionGemma: `top_k_experts`)."""
    if getattr(config, "top_k_experts", None):
        return config.intermediate_size + config.top_k_experts * config.moe_intermediate_size
    top_k = getattr(config, "num_experts_per_tok", None)
    if top_k is None:
        return config.intermediate_size
    return top_k * (getattr(config, "moe_intermediate_size", None) or config.intermediate_size)


def estimate_memory(config: PretrainedConfig, n_parameters: int, dtype_bytes: int, batch_size: int, tokens: int,
                    rank: int, n_bases: int, kl_rows: int, kl_positions: int,
                    edited_expert_parameters: int = 0, kl_top_k: int | None = None) -> dict[str, float]:
    """GiB per component of one training step: frozen weights, saved activations of the two objective
    forwards (harmful and harmless batch), the subspace with its gradient and Adam moments, and the
    cached original distributions the KL compares against (full vocabulary, or the top `kl_top_k` tokens), and for
    fused MoE experts the projected copy of every edited expert weight that autograd keeps for the backward pass.
    A multimodal config is read through its text config (the decoder's shape)."""
    config = config.get_text_config()
    layers = config.num_hidden_layers
    activations = 2 * batch_size * tokens * layers * activation_bytes_per_token_layer(config, dtype_bytes)
    kl_cache = kl_rows * kl_positions * ReferenceDistributions.position_bytes(config.vocab_size, kl_top_k)
    return {
        "weights_gib": n_parameters * dtype_bytes / GIB,
        "activations_gib": activations / GIB,
        "subspace_gib": n_bases * config.hidden_size * rank * 4 * 4 / GIB,
        "kl_cache_gib": kl_cache / GIB,
        "expert_weight_copies_gib": edited_expert_parameters * dtype_bytes / GIB,
    }
