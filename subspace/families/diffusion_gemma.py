"""DiffusionGemma (transformers `diffusion_gemma`): a causal encoder and a bidirectional block-diffusion decoder
that run one set of layer tensors.

The encoder reads the prompt (and each finished block) into a KV cache; the decoder refines a canvas of
`config.canvas_length` tokens that attends to that cache and to itself. The canvas starts as uniform random
tokens (there is no mask token): the sampler accepts low-entropy predictions and re-noises the rest.

Canonical path. `model.encoder.language_model.layers.N` and `model.decoder.layers.N` are distinct module objects
holding the same `Parameter` objects, so every site is named once, through the decoder's list
(`model.decoder.layers`): the decoder is the half whose output the logits (so the KL and the refusal term) and
`output_hidden_states` (so the residuals) are read from, and transformers declares the tie from it
(`_tied_weights_keys` maps the encoder's and the LM head's names onto the decoder's tensors).

Both halves are edited. Weight form (`ProjectionEdit.merged`, export) edits the shared tensor once, whatever name
reaches it (`merged_deltas` groups by storage). Activation form (training hooks, `edit.applied`) is hooked on
every module object running a site's weights (`Site.aliases`): the decoder's module and the encoder's twin.
Generation and evaluation still use the weight form (`requires_weight_form`): it is what a merged checkpoint
generates, and it costs one merge per evaluation where hooks would re-project every stacked expert tensor at
every encoder and decoder forward (tens of denoising steps per block).

Post-norm caveat: each sub-layer's output is RMS-normalised (`post_attention_layernorm`,
`post_feedforward_layernorm_1/_2`, `post_feedforward_layernorm`) before it joins the residual stream. Editing a
writer (hooks or weights, which agree exactly) removes U from the writer's output, but the norm's per-channel
scale re-introduces a component along U into the residual stream: neither form equals projecting the residual
stream itself. `edit_at="residual"` moves every site of a layer to where its sub-layer joins the residual stream
(the outputs of `post_attention_layernorm` and `post_feedforward_layernorm`, dense MLP and experts together):
the projection the method means, hooks only (a norm's output has no weight form, so no merge, no export, and
`method.moe_scope` has nothing left to choose). `scripts/post_norm_gap.py` measures the gap between the two.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from subspace.families.base import CANVAS_KL_AT, WRITER_KINDS, Family, WriterSite, log_softmax32, masked_canvases
from subspace.families.moe import recorded_routing

log = logging.getLogger(__name__)
ENCODER_LAYERS = "model.encoder.language_model.layers"
EDIT_AT = ("writers", "residual")  # where a layer's edit acts: see "Post-norm caveat" above
RESIDUAL_ENTRIES = {"attn_out": "post_attention_layernorm"}  # every MLP kind: "post_feedforward_layernorm"
SAMPLER_KEYS = ("max_denoising_steps", "t_min", "t_max", "entropy_bound", "stability_threshold",
                "confidence_threshold", "cache_implementation")


class _Union(Mapping[str, Tensor]):
    """{experts name: fired} read as the union of the decoder's and the encoder's routing (same experts tensors)."""

    def __init__(self, decoder: dict[str, Tensor], encoder: dict[str, Tensor], twin: dict[str, str]):
        self.decoder, self.encoder, self.twin = decoder, encoder, twin

    def __getitem__(self, name: str) -> Tensor:
        return self.decoder[name] | self.encoder[self.twin[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.decoder)

    def __len__(self) -> int:
        return len(self.decoder)


class DiffusionGemmaFamily(Family):
    """Refusal is read at the first canvas positions of the decoder's first denoising step, on a fixed noise canvas
    (drawn once from `seed`, the same for every prompt, so the KL compares like with like); the sampler is the
    model's own block-diffusion `generate`, seeded."""

    name = "diffusion_gemma"
    LAYER_PATHS = ("model.decoder.layers",)
    ATTENTION_WRITERS = ("self_attn.o_proj",)
    MLP_WRITERS = ("mlp.down_proj",)
    requires_weight_form = True  # the Evaluator merges the edit for generation and KL (see the module docstring)
    default_max_new_tokens = 48  # one and a half canvases; its measured results read 48 (96 triples the sampling time)

    def __init__(self, model: PreTrainedModel, canvas_length: int | None = None, kl_positions: int = 4, seed: int = 0,
                 sampler: Mapping[str, Any] | None = None, long_prompts: str = "truncate", edit_at: str = "writers"):
        super().__init__(model, long_prompts)
        if edit_at not in EDIT_AT:
            raise ValueError(f"family edit_at={edit_at!r} must be one of {EDIT_AT}: the writers' weights (exportable), "
                             "or the sub-layers' outputs after their post-norms (hooks only)")
        self.edit_at = edit_at
        self.text_config = model.config.get_text_config()
        self.canvas_length = canvas_length or model.config.canvas_length
        if not 0 < kl_positions <= self.canvas_length:
            raise ValueError(f"kl_positions={kl_positions} must be in 1..canvas_length={self.canvas_length}")
        if unknown := sorted(set(sampler or {}) - set(SAMPLER_KEYS)):
            raise ValueError(f"unknown DiffusionGemma sampler settings {unknown}; valid: {SAMPLER_KEYS}")
        self.kl_positions = self.response_positions = kl_positions
        self.seed, self.sampler = seed, dict(sampler or {})
        self.kl_at = (f"first {kl_positions} canvas positions, first denoising step on a fixed noise canvas of "
                      f"{self.canvas_length} (seed {seed})")
        self.encoder_layers = model.get_submodule(ENCODER_LAYERS)
        self._check_tied()
        generator = torch.Generator().manual_seed(seed)
        self.canvas = torch.randint(0, self.text_config.vocab_size, (self.canvas_length,), generator=generator)

    def _check_tied(self) -> None:
        """Every site is named through the decoder: that edits the encoder too only if it runs the same tensors."""
        for i, (enc, dec) in enumerate(zip(self.encoder_layers, self.layers)):
            if any(p is not q for p, q in zip(enc.parameters(), dec.parameters())):
                raise ValueError(f"layer {i} of the encoder and the decoder hold different tensors (an untied "
                                 "DiffusionGemma, tie_word_embeddings=False?); edits name the decoder's tensors "
                                 "only, so the encoder would stay unedited: untied checkpoints are not supported")

    @property
    def max_prompt_tokens(self) -> int | None:
        """The context less the canvas the objective appends."""
        return super().max_prompt_tokens - self.canvas_length

    def writer_sites(self, layers: Sequence[int] | None = None,
                     kinds: Sequence[str] = WRITER_KINDS) -> list[WriterSite]:
        """As `Family.writer_sites`, plus the dense MLP that every layer runs beside its experts ("mlp_out");
        with `edit_at="residual"`, their residual entries instead (one for attention, one for the whole MLP)."""
        chosen = range(self.num_layers) if layers is None else [self.check_layer(i) for i in layers]
        sites: list[WriterSite] = []
        for i in chosen:
            layer_sites = super().writer_sites([i], kinds)
            if "mlp_out" in kinds and i in self.moe_blocks:  # forward order: attention, dense MLP, experts
                layer_sites.insert(int("attn_out" in kinds), self._linear_site(i, "mlp_out", self.MLP_WRITERS))
            sites += layer_sites
        if self.edit_at == "residual":
            entries = {self.residual_entry(s): s for s in sites}  # insertion order: forward order, one per entry
            return [WriterSite(name, s.layer, "attn_out" if s.kind == "attn_out" else "mlp_out")
                    for name, s in entries.items()]
        return sites

    def residual_entry(self, site: WriterSite) -> str:
        """The post-norm whose output joins the residual stream: attention's, or the one over dense MLP + experts."""
        return f"{self.layers_path}.{site.layer}.{RESIDUAL_ENTRIES.get(site.kind, 'post_feedforward_layernorm')}"

    @contextmanager
    def recorded_routing(self) -> Iterator[Mapping[str, Tensor]]:
        """Experts that fired in either half, under the decoder's names: the encoder routes the prompt tokens
        through the same expert tensors the decoder routes the canvas through."""
        decoder = {f"{self.layers_path}.{i}": b for i, b in self.moe_blocks.items()}
        encoder = {f"{ENCODER_LAYERS}.{i}": b for i, b in self.moe_blocks.items()}
        twin = {f"{self.layers_path}.{i}.{b.experts}": f"{ENCODER_LAYERS}.{i}.{b.experts}"
                for i, b in self.moe_blocks.items()}
        with ExitStack() as stack:
            fired_dec = stack.enter_context(recorded_routing(self.model, decoder))
            fired_enc = stack.enter_context(recorded_routing(self.model, encoder))
            yield _Union(fired_dec, fired_enc, twin)

    def with_canvas(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Model inputs: the prompt for the encoder, the fixed noise canvas for the decoder (which sees the whole
        unpadded prompt and canvas), canvas positions following the prompt as in `generate`."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        n, length = ids.shape
        canvas = self.canvas.to(ids.device).expand(n, -1)
        seen = torch.cat([mask, torch.ones_like(canvas, dtype=mask.dtype)], 1)
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": canvas, "decoder_attention_mask": seen,
                "decoder_position_ids": torch.arange(length, length + self.canvas_length, device=ids.device)[None]}

    @torch.no_grad()
    def residuals(self, batch: dict[str, Tensor]) -> Tensor:
        """The decoder's residual stream entering each layer at the first canvas position."""
        out = self.model.model(**self.with_canvas(batch), output_hidden_states=True)
        return torch.stack([h[:, 0, :].float() for h in out.hidden_states[: self.num_layers]])

    def response_logprobs(self, batch: dict[str, Tensor]) -> Tensor:
        """The LM head on the first `kl_positions` canvas positions only (the full canvas × vocabulary is the largest
        activation), soft-capped as the model's forward does."""
        return self._canvas_logprobs(self.with_canvas(batch), self.kl_positions)

    def _canvas_logprobs(self, inputs: dict[str, Tensor], positions: int) -> Tensor:
        hidden = self.model.model(**inputs).last_hidden_state[:, :positions]
        logits = self.model.lm_head(hidden).float()
        cap = self.model.final_logit_softcapping
        return log_softmax32(torch.tanh(logits / cap) * cap if cap else logits)

    kl_response_at = CANVAS_KL_AT

    def answer_logprobs(self, batch: dict[str, Tensor], answers: Tensor) -> tuple[Tensor, Tensor]:
        inputs = self.with_canvas(batch)
        answers = answers.to(batch["input_ids"].device)[:, : self.canvas_length]
        n = answers.shape[1]
        noise = inputs["decoder_input_ids"]
        canvases, hidden = masked_canvases(answers, noise[0, :n])
        out = [self._canvas_logprobs(inputs | {"decoder_input_ids": torch.cat([canvas, noise[:, n:]], 1)}, n)
               for canvas in canvases]
        return torch.cat(out, 1), torch.cat(list(hidden), 1)

    def generate(self, tokenizer: PreTrainedTokenizerBase, batch: dict[str, Tensor], max_new_tokens: int) -> Tensor:
        """The model's block-diffusion sampler, whole canvases cut back to max_new_tokens; tokens after a stop token
        are padding. It has no greedy mode (noise canvases, multinomial draws), so it runs under a fixed seed: the
        same prompts in the same batches give the same text, and before/after compare under the same noise."""
        config = self.model.generation_config
        kwargs = {k: v for k, v in self.sampler.items() if k != "entropy_bound"}
        if "entropy_bound" in self.sampler:
            from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

            kwargs["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(self.sampler["entropy_bound"]))
        device = self.model.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            out = self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      max_new_tokens=max_new_tokens, return_dict_in_generate=True,
                                      pad_token_id=config.pad_token_id if config.pad_token_id is not None
                                      else tokenizer.pad_token_id,
                                      eos_token_id=config.eos_token_id if config.eos_token_id is not None
                                      else tokenizer.eos_token_id, **kwargs)
        start = batch["input_ids"].shape[1]
        return out.sequences[:, start: start + max_new_tokens]

    def stop_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return super().stop_token_ids(tokenizer) | set([eos] if isinstance(eos, int) else eos or [])
