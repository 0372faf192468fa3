"""Tiny random models of the real transformers classes, with a tokenizer trained here: tests need no hub."""

from __future__ import annotations

from functools import lru_cache

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from subspace.data.loading import builtin_names, load_prompts
from subspace.data.refusals import DEFAULT_REFUSALS
from subspace.models.bundle import ModelBundle

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]
# A ~17k-parameter Gemma-4 vision tower: DiffusionGemma always builds one, and the default alone is ~167M parameters.
TINY_VISION_CONFIG = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, head_dim=8, position_embedding_size=64)


@lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the project's own prompts, with a ChatML chat template."""
    corpus = [p for name in builtin_names() for p in load_prompts(f"builtin:{name}")] + list(DEFAULT_REFUSALS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


def tiny_llama(vocab_size: int, hidden_size: int = 64, num_layers: int = 4, seed: int = 0,
               pad_token_id: int = 0, eos_token_id: int = 2) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                         bos_token_id=1, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def tiny_random_causal(hidden_size: int = 64, num_layers: int = 4, seed: int = 0, vocab_size: int = 512) -> ModelBundle:
    tokenizer = tiny_tokenizer(vocab_size)
    model = tiny_llama(len(tokenizer), hidden_size, num_layers, seed, tokenizer.pad_token_id, tokenizer.eos_token_id)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return ModelBundle(model, tokenizer, f"tiny-llama-{hidden_size}x{num_layers}",
                       {"tiny_random": {"hidden_size": hidden_size, "num_layers": num_layers, "seed": seed,
                                        "vocab_size": vocab_size}})


def tiny_diffusion_gemma(hidden_size: int = 64, num_layers: int = 2, num_experts: int = 4, canvas_length: int = 8,
                         seed: int = 0, vocab_size: int = 512) -> ModelBundle:
    """A tiny random `DiffusionGemmaForBlockDiffusion` (encoder and decoder sharing every layer tensor, fused
    experts beside a dense MLP, post-norm layers) with the ChatML tokenizer above.

    The vision tower is shrunk to ~17k parameters (the default one alone is ~167M); attention layers are one
    sliding and one full, with a window longer than any test prompt. `family_options` keep the sampler short.
    """
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma.configuration_diffusion_gemma import DiffusionGemmaTextConfig

    tokenizer = tiny_tokenizer(vocab_size)
    layer_types = ["sliding_attention"] * (num_layers - 1) + ["full_attention"]
    text = DiffusionGemmaTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                                    intermediate_size=2 * hidden_size, num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1,
                                    head_dim=16, global_head_dim=16, num_experts=num_experts, top_k_experts=2,
                                    moe_intermediate_size=hidden_size // 2, sliding_window=256, layer_types=layer_types,
                                    max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    config = DiffusionGemmaConfig(text_config=text.to_dict(), vision_config=dict(TINY_VISION_CONFIG),
                                  canvas_length=canvas_length)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval().requires_grad_(False)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return ModelBundle(model, tokenizer, f"tiny-diffusion-gemma-{hidden_size}x{num_layers}",
                       {"tiny_random": {"family": "diffusion_gemma", "hidden_size": hidden_size,
                                        "num_layers": num_layers, "num_experts": num_experts,
                                        "canvas_length": canvas_length, "seed": seed}},
                       {"kl_positions": 4, "sampler": {"max_denoising_steps": 4}})
