"""Memory estimates per component, from the config alone (so they also hold for sizes that do not fit here)."""

from __future__ import annotations

from transformers import PretrainedConfig

GIB = 1024 ** 3


def activation_bytes_per_token_layer(config: PretrainedConfig, dtype_bytes: int) -> int:
    """Rough upper bound of what autograd keeps per token and decoder layer in a Llama-style block.

    In the model dtype: the block input, q/k/v, the attention output and the writer inputs (≈ 6·d)
    and the gate/up/activation/product tensors of the MLP (4·f); in float32: the two norms'
    normalised copies, rotary's q/k and the projection hooks' float32 copies of both writer outputs (≈ 8·d).
    """
    d, f = config.hidden_size, config.intermediate_size
    return d * (6 * dtype_bytes + 8 * 4) + 4 * f * dtype_bytes


def estimate_memory(config: PretrainedConfig, n_parameters: int, dtype_bytes: int, batch_size: int, tokens: int,
                    rank: int, n_bases: int, kl_rows: int, kl_positions: int) -> dict[str, float]:
    """GiB per component of one training step: frozen weights, saved activations of the two objective
    forwards (harmful and harmless batch), the subspace with its gradient and Adam moments, and the
    cached original distributions the KL compares against (float32, full vocabulary)."""
    layers = config.num_hidden_layers
    activations = 2 * batch_size * tokens * layers * activation_bytes_per_token_layer(config, dtype_bytes)
    return {
        "weights_gib": n_parameters * dtype_bytes / GIB,
        "activations_gib": activations / GIB,
        "subspace_gib": n_bases * config.hidden_size * rank * 4 * 4 / GIB,
        "kl_cache_gib": kl_rows * kl_positions * config.vocab_size * 4 / GIB,
    }
