"""LLaDA's configuration, with the field names of the published `config.json` (GSAI-ML/LLaDA-8B-Instruct)."""

from __future__ import annotations

from transformers import PretrainedConfig

# Published fields whose other values select code paths this implementation does not have.
SUPPORTED_VALUES = {
    "block_type": ("llama",), "layer_norm_type": ("rms",), "activation_type": ("silu",), "alibi": (False,),
    "include_bias": (False,), "include_qkv_bias": (False,), "scale_logits": (False,), "input_emb_norm": (False,),
    "attention_layer_norm": (False,), "bias_for_layer_norm": (False, None), "rope": (True,),
}


class LLaDAConfig(PretrainedConfig):
    """A bidirectional Llama-style masked-diffusion model (LLaDA), sized by OLMo-style field names.

    `shift_logits` is this project's addition (absent, i.e. False, in the published model): when
    True the prediction for token j is read from position j−1, as in a causal LM. Organisms
    warm-started from a causal model keep their LM head aligned this way.
    """

    model_type = "llada"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                     "num_key_value_heads": "n_kv_heads", "intermediate_size": "mlp_hidden_size"}

    def __init__(self, d_model: int = 4096, n_heads: int = 32, n_kv_heads: int | None = None, n_layers: int = 32,
                 mlp_hidden_size: int = 12288, mlp_ratio: int = 4, vocab_size: int = 126464,
                 embedding_size: int | None = 126464, max_sequence_length: int = 4096, rope_theta: float = 500000.0,
                 rms_norm_eps: float = 1e-5, weight_tying: bool = False, mask_token_id: int = 126336,
                 eos_token_id: int = 126081, pad_token_id: int = 126081, init_std: float = 0.02,
                 shift_logits: bool = False, **kwargs):
        for field, valid in SUPPORTED_VALUES.items():
            if field in kwargs and kwargs[field] not in valid:
                raise ValueError(f"LLaDA config {field}={kwargs[field]!r} is not supported; valid: {list(valid)}")
        self.d_model, self.n_heads, self.n_layers = d_model, n_heads, n_layers
        self.n_kv_heads = n_kv_heads or n_heads
        if d_model % n_heads or n_heads % self.n_kv_heads:
            raise ValueError(f"d_model={d_model}, n_heads={n_heads}, n_kv_heads={self.n_kv_heads}: d_model must divide "
                             "into n_heads heads and n_heads into n_kv_heads groups")
        self.mlp_hidden_size, self.mlp_ratio = mlp_hidden_size, mlp_ratio
        self.embedding_size = embedding_size or vocab_size
        self.max_sequence_length, self.rope_theta, self.rms_norm_eps = max_sequence_length, rope_theta, rms_norm_eps
        self.weight_tying, self.mask_token_id, self.init_std = weight_tying, mask_token_id, init_std
        self.shift_logits = shift_logits
        kwargs.setdefault("tie_word_embeddings", False)  # tying is LLaDA's own `weight_tying`, handled in the model
        super().__init__(vocab_size=vocab_size, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads
