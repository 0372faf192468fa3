"""Tiny random models of every decoder-only language-model class in transformers' causal-LM mapping, for the
architecture coverage matrix (`tests/test_architectures.py`, `scripts/coverage.py`).

One builder for all of them: the class's default config with every size field shrunk (`shrink`), so a class is
tested as transformers defines it, not as a hand-written config would guess it. Layer-pattern fields (hybrid
stacks: attention beside linear attention, Mamba or convolution mixers; dense layers before MoE layers) are cut
to a few layers that keep one layer of each kind. `OVERRIDES` holds what a class needs beyond the generic rule.

Scope (`in_scope`): a class of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` is a decoder-only language model unless its model
type is also an encoder or an encoder–decoder model (it appears in the masked-LM or sequence-to-sequence mappings:
BERT, RoBERTa, BART, Marian, …), an audio model (it appears in an audio or speech mapping: Whisper, MusicGen), or one
of `EXCLUDED` (decoder halves of encoder–decoder models that are not in those mappings, speech and image
generation, permutation language modelling), each with its reason.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto import modeling_auto

EXCLUDED = {
    "bert-generation": "the decoder half of an encoder–decoder model (BertGeneration)",
    "trocr": "the text decoder of a vision encoder–decoder (OCR) model",
    "moshi": "a speech–text model (audio codec tokens)",
    "emu3": "an image-generation model (VQ image tokens)",
    "xlnet": "a permutation language model (two-stream attention), not a causal decoder",
}
AUDIO_WORDS = ("AUDIO", "SPEECH", "CTC", "WAVEFORM", "SPECTROGRAM")

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, EXPERTS, TOP_K, EXPERT_FFN = 64, 4, 2, 16, 96, 4, 2, 32
# field → its tiny value; a field is only ever made smaller (a default already below it is kept)
SIZES: dict[str, int] = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "embedding_size", "dim", "emb_dim", "attention_hidden_size",
                     "lru_width", "word_embed_proj_dim", "input_embedding_size", "output_embedding_size",
                     "backbone_hidden_size"), HIDDEN),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "decoder_ffn_dim", "ffn_hidden_size", "n_inner", "dim_ff",
                     "d_inner", "intermediate_size_mlp", "dense_intermediate_size", "feed_forward_size",
                     "expert_ffn_hidden_size"), FFN),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "decoder_attention_heads", "num_heads",
                     "swa_num_attention_heads", "attention_heads"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "swa_num_key_value_heads", "multi_query_group_num",
                     "num_query_groups"), KV_HEADS),
    **dict.fromkeys(("head_dim", "swa_head_dim", "kv_channels", "attention_head_dim", "d_head", "dim_head",
                     "attention_head_size", "qk_head_dim", "v_head_dim", "linear_key_head_dim",
                     "linear_value_head_dim", "linear_head_dim", "mamba_d_head", "mamba_head_dim", "mamba_headdim",
                     "index_head_dim"), HEAD_DIM),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size",
                     "moe_shared_expert_intermediate_size", "shared_experts_intermediate_size"), EXPERT_FFN),
    **dict.fromkeys(("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"), EXPERTS),
    **dict.fromkeys(("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k", "moe_top_k", "moe_k"), TOP_K),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "n_group", "topk_group", "num_expert_group",
                     "first_k_dense_replace", "zero_expert_num"), 1),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_sequence_length",
                     "context_length", "model_max_length"), 256),
    **dict.fromkeys(("sliding_window", "sliding_window_size", "attention_window_size", "local_attention",
                     "window_size", "attention_chunk_size", "chunk_size", "mamba_chunk_size"), 32),
    "kv_lora_rank": 16, "q_lora_rank": 32, "o_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "rotary_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_num_heads": 4,
    **dict.fromkeys(("mamba_d_state", "state_size", "ssm_state_size", "d_state"), 8),
    **dict.fromkeys(("mamba_n_heads", "mamba_num_heads", "n_mamba_heads"), 8),
    **dict.fromkeys(("time_step_rank", "mamba_dt_rank"), 8),
    "mamba_d_ssm": 128, "index_n_heads": 2, "index_topk": 16, "router_hidden_size": 32, "gated_norm_rank": 8,
    "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 64, "laurel_rank": 8, "loop_gate_rank": 8,
    "hc_lowrank": 8, "ple_embed_dim": 8, "num_centroids": 4, "centroid_intermediate_top_k": 2,
}
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
# per-layer lists whose entries name a layer's kind: cut to one layer of each kind, in order of first appearance
LAYER_PATTERNS = ("layer_types", "layers_block_type", "block_types", "layers_block_types", "hybrid_override_pattern")
# per-layer index lists (layers of one kind): kept below the new layer count, or the last layer if none is
LAYER_INDICES = ("full_attn_idxs", "moe_layers", "hybrid_layer_ids", "attn_layer_indices", "mlp_only_layers",
                 "dense_layers", "swa_layers")

# what the generic rule gets wrong, per model type: applied after shrinking (values may be callables of the config)
OVERRIDES: dict[str, dict[str, Any]] = {
    "gpt_oss": {"layer_types": ["sliding_attention", "full_attention"]},
    "llama4_text": {"moe_layers": [1], "no_rope_layers": [1, 0], "interleave_moe_layer_step": 1,
                    "intermediate_size_mlp": FFN, "intermediate_size": EXPERT_FFN},
    "zamba2": {"hybrid_layer_ids": [1], "mamba_ngroups": 1},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    # full attention first: a tiny random linear-attention or convolution layer barely mixes tokens, so the last
    # token's residual would hardly differ between prompts before the second layer
    "qwen3_next": {"layer_types": ["full_attention", "linear_attention"]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "lfm2_moe": {"layer_types": ["full_attention", "conv"], "num_dense_layers": 1},
    "mamba2": {"num_heads": 8, "n_groups": 1},
    "bamba": {"attn_layer_indices": [1]},
    "deepseek_v2": {"num_experts_per_tok": TOP_K, "first_k_dense_replace": 1},
    "ernie4_5_moe": {"moe_layer_start_index": 1, "moe_layer_end_index": 1},
}


def causal_lm_classes() -> dict[str, str]:
    """{model type: class name} of transformers' causal-LM mapping."""
    return dict(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def exclusion(model_type: str) -> str | None:
    """Why a model type of the causal-LM mapping is not a decoder-only language model, or None when it is one."""
    if model_type in EXCLUDED:
        return EXCLUDED[model_type]
    if model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "an encoder model (in the masked-LM mapping); its causal-LM class is a decoder head on an encoder"
    if model_type in modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return "an encoder–decoder model (in the sequence-to-sequence mapping); its causal-LM class is the decoder half"
    for name in dir(modeling_auto):
        if name.endswith("_MAPPING_NAMES") and any(w in name for w in AUDIO_WORDS) \
                and model_type in getattr(modeling_auto, name):
            return f"an audio model (in {name.removesuffix('_NAMES')})"
    return None


def in_scope() -> dict[str, str]:
    """{model type: class name} of every decoder-only language model in the causal-LM mapping."""
    return {t: c for t, c in causal_lm_classes().items() if exclusion(t) is None}


def _distinct(values: list) -> list:
    seen: list = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def shrink(fields: dict[str, Any], vocab_size: int, token_ids: dict[str, int], depth: int = 0) -> dict[str, Any]:
    """A config's fields (`to_dict()`, sub-configs as dicts) with every size made tiny: the keyword arguments to build
    the class's config from, so that what its `__init__` derives (head_dim, layer types, …) follows the new sizes."""
    out = dict(fields)
    for key, value in fields.items():
        if isinstance(value, dict) and "model_type" in value:  # a text config keeps two layers, towers get one
            out[key] = shrink(value, vocab_size, token_ids, 0 if key.startswith("text") else depth + 1)
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        if key in SIZES and value > SIZES[key]:
            out[key] = SIZES[key]
        elif key == "vocab_size" or (key.endswith("vocab_size") and value > vocab_size):
            out[key] = vocab_size
    if isinstance(out.get("qk_rope_head_dim"), int):  # MLA: the rotary part is what head_dim names
        out["head_dim"] = out["qk_rope_head_dim"]
        if "qk_head_dim" in out:
            out["qk_head_dim"] = out["qk_rope_head_dim"] + out.get("qk_nope_head_dim", 0)
    layers = next((k for k in LAYER_COUNTS if isinstance(fields.get(k), int)), None)
    old = fields.get(layers, 0) if layers else 0
    patterns = {k: fields[k] for k in LAYER_PATTERNS if isinstance(fields.get(k), (list, str)) and fields[k]}
    kinds = max((len(_distinct(list(p))) for p in patterns.values()), default=1)
    new = max(2, kinds) if depth == 0 or patterns else 1
    if layers and old > new:
        out[layers] = new
        for key, pattern in patterns.items():
            cut = (_distinct(list(pattern)) * new)[:new]
            out[key] = "".join(cut) if isinstance(pattern, str) else cut
        for key in LAYER_INDICES:
            if isinstance(fields.get(key), list) and fields[key]:
                out[key] = [i for i in fields[key] if isinstance(i, int) and i < new] or [new - 1]
        for key, value in fields.items():  # any other per-layer list: cut to the new count
            if isinstance(value, list) and len(value) == old and key not in patterns and key not in LAYER_INDICES:
                out[key] = value[:new]
    for key in ("head_dim", "num_key_value_heads"):  # None: derived in __init__ by some classes, not by others
        if key in fields and fields[key] is None and isinstance(out.get("num_attention_heads"), int):
            out[key] = HEAD_DIM if key == "head_dim" else out["num_attention_heads"]
    if isinstance(out.get("kv_lora_rank"), int) and isinstance(out.get("num_attention_heads"), int):
        out["num_key_value_heads"] = out["num_attention_heads"]  # MLA: keys and values per head
    heads, kv = out.get("num_attention_heads"), out.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and (kv > heads or heads % kv):
        out["num_key_value_heads"] = heads
    if "vocab_size" in fields:
        for key, token in token_ids.items():
            current = fields.get(key)
            if key in fields and (current is None or isinstance(current, list)
                                  or isinstance(current, int) and current >= vocab_size):
                out[key] = token
        for key, value in fields.items():  # other special tokens (image, audio, …) must lie in the vocabulary
            if key.endswith(("_token_id", "_token_index")) and key not in token_ids and isinstance(value, int) \
                    and value >= vocab_size:
                out[key] = vocab_size - 1 - sum(map(ord, key)) % 16
    return out


def tiny_config(model_type: str, vocab_size: int = 512, token_ids: dict[str, int] | None = None) -> PretrainedConfig:
    """The class's default config, shrunk (`shrink`), with `OVERRIDES[model_type]` (on the text config too)."""
    token_ids = token_ids if token_ids is not None else {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    fields = shrink(AutoConfig.for_model(model_type).to_dict(), vocab_size, token_ids)
    overrides = OVERRIDES.get(model_type, {})
    fields.update(overrides)
    for key, value in fields.items():
        if isinstance(value, dict) and key.startswith("text"):
            value.update({k: v for k, v in overrides.items() if k in value})
    for key in ("model_type", "transformers_version", "architectures"):
        fields.pop(key, None)
    return AutoConfig.for_model(model_type, **fields)


def tiny_model(model_type: str, vocab_size: int = 512, token_ids: dict[str, int] | None = None,
               seed: int = 0) -> nn.Module:
    """A tiny random model of the causal-LM class of `model_type`, float32, eval mode, frozen."""
    config = tiny_config(model_type, vocab_size, token_ids)
    config._attn_implementation = "eager"
    cls = getattr(modeling_auto, "MODEL_FOR_CAUSAL_LM_MAPPING")[type(config)]
    if not isinstance(config, cls.config_class):  # a text-only class mapped from a composite config (Qwen3.5, Llama 4)
        config = config.get_text_config()
    torch.manual_seed(seed)
    model = cls(config).float().eval().requires_grad_(False)
    with torch.no_grad():  # constant initial values (norm weights, zero-initialised gates) would make a path vanish
        for param in model.parameters():
            if param.numel() > 1 and bool((param == param.reshape(-1)[0]).all()):
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)) * 0.02)
    return model


def tiny_model_for(model_type: str, tokenizer, seed: int = 0) -> nn.Module:
    """`tiny_model` sized to `tokenizer`: its vocabulary and its pad, bos and eos ids."""
    return tiny_model(model_type, len(tokenizer), {"pad_token_id": tokenizer.pad_token_id,
                                                   "bos_token_id": tokenizer.bos_token_id,
                                                   "eos_token_id": tokenizer.eos_token_id}, seed)
