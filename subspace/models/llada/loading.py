"""Getting LLaDA weights: the published checkpoint, or a causal Llama warm start for organisms."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from subspace.models.bundle import ModelBundle, frozen_bundle, resolve_dtype
from subspace.models.llada.configuration import LLaDAConfig
from subspace.models.llada.modeling import LLaDAModelLM

LLADA_8B_NEEDS = "~16 GB of disk (bfloat16 safetensors) and ~17 GB of GPU memory to sample, ~24 GB or more to train"


def resolve_local(model_id: str, pretrained: str | None) -> Path:
    """A local directory holding the checkpoint: `pretrained`, else the Hugging Face cache or a download."""
    if pretrained is not None:
        path = Path(pretrained).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.pretrained={pretrained!r} has no config.json; point it at a local copy of "
                                    f"{model_id} (`huggingface-cli download {model_id} --local-dir DIR`).")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, local_files_only=os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")))
    except Exception as err:  # offline, no network, gated, or not in the cache: one message says what to do
        raise FileNotFoundError(
            f"could not get {model_id!r} ({type(err).__name__}: {err}).\n"
            f"Download it on a machine with hub access: `huggingface-cli download {model_id}` (it needs {LLADA_8B_NEEDS}), "
            f"then run again, or pass a local copy with model.pretrained=DIR."
        ) from err


def load_llada(model_id: str = "GSAI-ML/LLaDA-8B-Instruct", pretrained: str | None = None, *, dtype: str = "bfloat16",
               device: str = "auto", trust_remote_code: bool = False, name: str | None = None,
               family: Mapping[str, Any] | None = None) -> ModelBundle:
    """LLaDA in this project's class (strict key match), or in the published remote code when asked."""
    path = resolve_local(model_id, pretrained)
    if trust_remote_code:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(path, dtype=resolve_dtype(dtype), trust_remote_code=True)
    else:
        model = LLaDAModelLM.from_pretrained(path, dtype=resolve_dtype(dtype))
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return frozen_bundle(model, tokenizer, name or Path(model_id).name, {"pretrained": str(path), "model_id": model_id},
                         device, family)


LLAMA_TO_LLADA = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj",
    "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out", "post_attention_layernorm": "ff_norm",
    "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out",
}


def llada_from_llama(llama: LlamaForCausalLM, mask_token_id: int, vocab_size: int | None = None,
                     shift_logits: bool = True) -> LLaDAModelLM:
    """The same weights under LLaDA's names and bidirectional attention: the warm start of an organism.

    With `shift_logits` the LM head keeps predicting token j from position j−1, as it was trained to.
    Rows added to reach `vocab_size` (a new mask token) start as the mean embedding.
    """
    c = llama.config
    if c.hidden_act != "silu" or getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError(f"cannot convert {type(llama).__name__}: need silu MLPs without biases, got "
                         f"hidden_act={c.hidden_act!r}, attention_bias={getattr(c, 'attention_bias', None)}")
    if getattr(c, "head_dim", c.hidden_size // c.num_attention_heads) != c.hidden_size // c.num_attention_heads:
        raise ValueError(f"cannot convert: head_dim={c.head_dim} differs from hidden_size / num_attention_heads")
    rope_theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or getattr(c, "rope_theta", 10000.0)
    config = LLaDAConfig(d_model=c.hidden_size, n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads,
                         n_layers=c.num_hidden_layers, mlp_hidden_size=c.intermediate_size, vocab_size=vocab_size or c.vocab_size,
                         embedding_size=vocab_size or c.vocab_size, max_sequence_length=c.max_position_embeddings,
                         rope_theta=float(rope_theta), rms_norm_eps=c.rms_norm_eps,
                         weight_tying=bool(c.tie_word_embeddings), mask_token_id=mask_token_id,
                         eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, shift_logits=shift_logits)
    state = {"model.transformer.wte.weight": llama.model.embed_tokens.weight,
             "model.transformer.ln_f.weight": llama.model.norm.weight}
    if not config.weight_tying:
        state["model.transformer.ff_out.weight"] = llama.lm_head.weight
    for name, tensor in llama.model.layers.state_dict().items():
        index, rest = name.split(".", 1)
        module, leaf = rest.rsplit(".", 1)
        state[f"model.transformer.blocks.{index}.{LLAMA_TO_LLADA[module]}.{leaf}"] = tensor
    for key in ("model.transformer.wte.weight", "model.transformer.ff_out.weight"):
        if key in state and config.embedding_size > len(state[key]):
            rows = state[key]
            extra = rows.mean(0, keepdim=True).expand(config.embedding_size - len(rows), -1)
            state[key] = torch.cat([rows, extra])
    model = LLaDAModelLM(config).to(llama.dtype)
    model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return model.eval()
