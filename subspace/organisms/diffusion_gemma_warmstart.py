"""A causal Llama (the causal organism) as the starting point of a `DiffusionGemmaForBlockDiffusion`.

Copied unchanged (`copied_tensors`, checked by the tests): every layer's q/k/v projections, the o projection (not
the last layer's, see below), the dense MLP, the pre-norms (`input_layernorm`; Llama's `post_attention_layernorm`,
the norm before its MLP, into `pre_feedforward_layernorm` and `pre_feedforward_layernorm_2`). Encoder and decoder
are one set of tensors, so each copy lands in both halves.

Copied with a scale (exact up to the scale): the embeddings, tied to the LM head, as E·c/√d, and the final norm as
Llama's ·√d/c. DiffusionGemma multiplies embeddings by √d, and its decoder RMS-normalises the canvas embeddings
(self-conditioning's post-norm), so c = 1/(median RMS of an embedding row) puts the encoder's and the decoder's
residual streams on the same scale; every sub-layer reads it through a pre-norm, so only ratios matter, and the
logits are unchanged.

Upcycled (`upcycle.expert_copies`, as the MoE organism): each expert is the dense MLP plus Gaussian noise of `noise`
times each tensor's std. With copies the experts' branch equals the dense branch, so `post_feedforward_layernorm_1/_2`
are 1 and the block's output is the MLP's direction.

Calibrated on the causal model's activations (`causal_statistics`): the post-norms `post_attention_layernorm` and
`post_feedforward_layernorm` get (c times) the median RMS of Llama's attention and MLP outputs, so each sub-layer
writes its direction at Llama's typical magnitude; `q_norm`/`k_norm` get the per-channel least-squares scale of
the normalised queries/keys over head_dim^¼, so that, with DiffusionGemma's attention scaling of 1, the logits
approximate Llama's q·k/√head_dim. Values are RMS-normalised
with no scale (`v_norm`); the post-norm absorbs that.

The last layer is DiffusionGemma's one full-attention layer (its config forces it), which has no v_proj: its values
are its (normalised) keys. Its k_proj is Llama's; its o_proj is Llama's times a ridge fit, per kv head, of Llama's
values from the normalised keys (R² reported), so o_proj still maps toward what Llama's values would have said.

New: routers (N(0, router_std) projections, unit scales), the self-conditioning block (its down projection zero,
so it adds nothing until trained), q/k/v norms' shapes, and a minimal vision tower (`TINY_VISION_CONFIG`, unused).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, PreTrainedModel
from transformers.models.diffusion_gemma.configuration_diffusion_gemma import DiffusionGemmaTextConfig

from subspace.organisms.causal_statistics import CausalStatistics
from subspace.models.tiny import TINY_VISION_CONFIG
from subspace.organisms.upcycle import check_convertible, expert_copies

# decoder layer tensor <- causal layer tensor, copied unchanged (v_proj where the layer has one)
LAYER_COPIES = {f"self_attn.{p}_proj.weight": f"self_attn.{p}_proj.weight" for p in "qkvo"} | {
    f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")} | {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_feedforward_layernorm.weight": "post_attention_layernorm.weight",
    "pre_feedforward_layernorm_2.weight": "post_attention_layernorm.weight"}


def diffusion_gemma_config(llama, canvas_length: int, num_experts: int, top_k: int) -> DiffusionGemmaConfig:
    """The causal model's shapes; every layer sliding (window = context, so in effect full) but the last, which
    DiffusionGemma's config forces to full attention; Llama's RoPE in both; experts as wide as the MLP."""
    check_convertible(llama)
    rope = {"rope_type": "default", "rope_theta": llama.rope_parameters["rope_theta"]}
    n = llama.num_hidden_layers
    text = DiffusionGemmaTextConfig(
        vocab_size=llama.vocab_size, hidden_size=llama.hidden_size, intermediate_size=llama.intermediate_size,
        num_hidden_layers=n, num_attention_heads=llama.num_attention_heads,
        num_key_value_heads=llama.num_key_value_heads, head_dim=llama.head_dim, global_head_dim=llama.head_dim,
        hidden_activation=llama.hidden_act, max_position_embeddings=llama.max_position_embeddings,
        rms_norm_eps=llama.rms_norm_eps, pad_token_id=llama.pad_token_id, eos_token_id=llama.eos_token_id,
        bos_token_id=llama.bos_token_id, tie_word_embeddings=True, attention_bias=False,
        rope_parameters={"sliding_attention": rope, "full_attention": dict(rope)},
        sliding_window=llama.max_position_embeddings, layer_types=["sliding_attention"] * (n - 1) + ["full_attention"],
        num_experts=num_experts, top_k_experts=top_k, moe_intermediate_size=llama.intermediate_size)
    return DiffusionGemmaConfig(text_config=text.to_dict(), vision_config=dict(TINY_VISION_CONFIG),
                                canvas_length=canvas_length)


def copied_tensors(model: DiffusionGemmaForBlockDiffusion) -> dict[str, str]:
    """{DiffusionGemma parameter: causal parameter} of every tensor the warm start copies unchanged."""
    pairs, last = {}, model.config.text_config.num_hidden_layers - 1
    for i, layer in enumerate(model.model.decoder.layers):
        for dst, src in LAYER_COPIES.items():
            if (dst.startswith("self_attn.v_proj") and layer.self_attn.v_proj is None) or (
                    i == last and dst.startswith("self_attn.o_proj")):
                continue
            pairs[f"model.decoder.layers.{i}.{dst}"] = f"model.layers.{i}.{src}"
    return pairs


def refit_values(o_proj: Tensor, keys: Tensor, values: Tensor, num_heads: int, ridge: float = 1e-3
                 ) -> tuple[Tensor, float]:
    """(o_proj · M, R²): M per kv head the ridge fit of `values` from RMS-normalised `keys` ([tokens, kv, d])."""
    x = keys / keys.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    kv, d = keys.shape[1:]
    out, residual, total = o_proj.clone().float(), 0.0, 0.0
    for g in range(kv):
        xg, yg = x[:, g].double(), values[:, g].double()
        gram = xg.T @ xg
        fit = torch.linalg.solve(gram + ridge * gram.trace() / d * torch.eye(d, dtype=gram.dtype), xg.T @ yg)
        residual += float((xg @ fit - yg).pow(2).sum())
        total += float((yg - yg.mean(0)).pow(2).sum())
        for h in range(g * num_heads // kv, (g + 1) * num_heads // kv):
            out[:, h * d:(h + 1) * d] = o_proj[:, h * d:(h + 1) * d].double() @ fit.T
    return out, 1 - residual / total


@torch.no_grad()
def warm_start(causal: PreTrainedModel, stats: CausalStatistics, canvas_length: int, num_experts: int = 4,
               top_k: int = 2, noise: float = 0.01, router_std: float = 0.02, seed: int = 0
               ) -> tuple[DiffusionGemmaForBlockDiffusion, dict]:
    """(the DiffusionGemma model in float32, {what the warm start measured}); see the module docstring."""
    model = DiffusionGemmaForBlockDiffusion(diffusion_gemma_config(causal.config, canvas_length, num_experts, top_k))
    generator = torch.Generator().manual_seed(seed)
    for dst, src in copied_tensors(model).items():
        model.get_parameter(dst).copy_(causal.get_parameter(src))
    scale, root = 1.0 / stats.embed_rms, model.config.text_config.hidden_size ** 0.5
    model.model.decoder.embed_tokens.weight.copy_(causal.get_input_embeddings().weight * scale / root)
    model.model.decoder.norm.weight.copy_(causal.model.norm.weight * root / scale)
    head_dim = causal.config.head_dim
    for i, (layer, dense) in enumerate(zip(model.model.decoder.layers, causal.model.layers)):
        layer.post_attention_layernorm.weight.fill_(scale * stats.attn_rms[i])
        layer.post_feedforward_layernorm.weight.fill_(scale * stats.mlp_rms[i])
        layer.post_feedforward_layernorm_1.weight.fill_(1.0)
        layer.post_feedforward_layernorm_2.weight.fill_(1.0)
        layer.self_attn.q_norm.weight.copy_(stats.q_scale[i] / head_dim ** 0.25)
        layer.self_attn.k_norm.weight.copy_(stats.k_scale[i] / head_dim ** 0.25)
        mlp = dense.mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).float()  # DiffusionGemma: gate, then up
        layer.experts.gate_up_proj.copy_(expert_copies(gate_up, num_experts, noise, generator))
        layer.experts.down_proj.copy_(expert_copies(mlp.down_proj.weight.float(), num_experts, noise, generator))
        layer.router.proj.weight.copy_(router_std * torch.randn(layer.router.proj.weight.shape, generator=generator))
        layer.router.scale.fill_(1.0)
        layer.router.per_expert_scale.fill_(1.0)
    last = model.model.decoder.layers[-1].self_attn
    o_proj, r2 = refit_values(causal.model.layers[-1].self_attn.o_proj.weight, stats.keys, stats.values,
                              causal.config.num_attention_heads)
    last.o_proj.weight.copy_(o_proj)
    model.model.decoder.self_conditioning.down_proj.weight.zero_()
    model.model.decoder.self_conditioning.pre_norm.weight.fill_(1.0)
    model.generation_config.update(pad_token_id=causal.config.pad_token_id, eos_token_id=causal.config.eos_token_id)
    return model.eval(), {"embedding_scale": scale, "last_layer_value_fit_r2": r2}
