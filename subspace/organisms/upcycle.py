"""Sparse upcycling: a dense Llama turned into a Mixtral mixture of experts whose experts start as its MLP.

Mixtral is the target class because its attention is Llama's (no q/k norm, no biases, same RoPE and RMSNorm),
so every non-MLP tensor carries over unchanged. Qwen3-MoE and OLMoE normalise queries and keys per head, which no
weight setting turns into the identity, so a converted Llama could not reproduce its own logits there. Mixtral's
router always renormalises its top-k probabilities to sum to 1; with every expert an exact copy of the dense MLP
the block's output is therefore exactly the dense output, whatever the router says: the converted model is the
dense model until the experts are made to differ.
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

# Llama config fields that Mixtral reads under the same name and meaning.
SHARED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
                 "rms_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
                 "rope_parameters", "attention_dropout")


def check_convertible(config) -> None:
    """Refuse Llama variants whose weights the converted model has no place for (they would be silently dropped)."""
    problems = [f"{name}={getattr(config, name)!r}" for name, ok in (
        ("attention_bias", False), ("mlp_bias", False), ("pretraining_tp", 1)) if getattr(config, name, ok) != ok]
    if getattr(config, "model_type", None) != "llama" or problems:
        raise ValueError(f"only a plain Llama (no attention or MLP biases, pretraining_tp=1) can be converted "
                         f"(into Mixtral or DiffusionGemma); got model_type={getattr(config, 'model_type', None)!r} {' '.join(problems)}")


def mixtral_config(dense, num_experts: int, top_k: int, aux_loss_coef: float = 0.001) -> MixtralConfig:
    """The Mixtral config of the upcycled model: the dense shapes, each expert as wide as the dense MLP."""
    check_convertible(dense)
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
    fields = {name: getattr(dense, name) for name in SHARED_FIELDS}
    return MixtralConfig(**fields, num_local_experts=num_experts, num_experts_per_tok=top_k, sliding_window=None,
                         router_aux_loss_coef=aux_loss_coef, router_jitter_noise=0.0, output_router_logits=False)


def upcycle_llama(dense: LlamaForCausalLM, num_experts: int = 4, top_k: int = 2, noise: float = 0.0,
                  router_std: float = 0.02, aux_loss_coef: float = 0.001, seed: int = 0) -> MixtralForCausalLM:
    """A Mixtral model whose every expert is the dense layer's MLP, plus Gaussian noise of `noise` times each
    weight tensor's std (independent per expert: the symmetry training alone could not break), and a router of
    small random weights (std `router_std`). In float32, whatever the dense model's dtype; with `noise=0` its
    logits are the dense model's."""
    config = mixtral_config(dense.config, num_experts, top_k, aux_loss_coef)
    moe = MixtralForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    state = {k: v.float() for k, v in dense.state_dict().items() if ".mlp." not in k}
    for i, layer in enumerate(dense.model.layers):
        mlp, prefix = layer.mlp, f"model.layers.{i}.mlp"
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach().float()  # Mixtral: gate, then up
        state[f"{prefix}.experts.gate_up_proj"] = expert_copies(gate_up, num_experts, noise, generator)
        state[f"{prefix}.experts.down_proj"] = expert_copies(mlp.down_proj.weight.detach().float(), num_experts, noise,
                                                       generator)
        state[f"{prefix}.gate.weight"] = router_std * torch.randn(num_experts, config.hidden_size, generator=generator)
    moe.load_state_dict(state, strict=True)
    moe.generation_config.update(**dense.generation_config.to_diff_dict())
    return moe.eval()


def expert_copies(weight: torch.Tensor, n: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """`[n, *weight.shape]`: n copies of a float32 weight, each with its own noise."""
    copies = weight.unsqueeze(0).repeat(n, *[1] * weight.ndim)
    if noise > 0:
        copies += noise * weight.std() * torch.randn(copies.shape, generator=generator)
    return copies
