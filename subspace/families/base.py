"""What every family adapter shares: finding layers and residual writers, and building chat batches.

A family subclass adds the three things that differ between architectures: where the refusal
decision is read (`residuals`), the next-token distributions the objective compares
(`response_logprobs`) and the model's own sampler (`generate`).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from subspace.families.moe import MoEBlock, find_moe_block, recorded_routing, traced_moe_block
from subspace.families.structure import LayerTrace, TracedWriter, classify, trace_layers

log = logging.getLogger(__name__)

LONG_PROMPT_POLICIES = ("truncate", "error")  # what chat_batch does with a prompt over its token limit
# Residual writers with a weight form (the default sites); "moe_out" is a MoE block's combined output (hooks only).
WRITER_KINDS = ("attn_out", "mlp_out", "expert_out", "shared_expert_out")
SITE_KINDS = WRITER_KINDS + ("moe_out",)


@dataclass(frozen=True)
class WriterSite:
    """A matrix (or, for kind "moe_out", a block) whose output is added to the residual stream in layer `layer`.

    `name` is a module name, except for fused experts ("expert_out" with `expert` None), where it names the
    3-D parameter `[num_experts, d, in]` holding every expert's down-projection. `experts` is the experts
    module whose routing decides which of the site's slices run; `expert` the index of a ModuleList expert.
    """

    name: str
    layer: int
    kind: str  # one of SITE_KINDS
    experts: str | None = None
    expert: int | None = None
    after: str | None = None  # the norm or per-channel scale between the writer and the residual stream (post-norm)


def get_submodule(module: nn.Module, dotted: str) -> nn.Module | None:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


class Family:
    """Base adapter; subclasses name their layer lists and writer modules."""

    name = "base"
    kl_at = "first response token"  # where `response_logprobs` reads: said next to every KL this family reports
    response_positions = 1  # how many response positions `response_logprobs` returns
    reads_prefixes = False  # whether `prefix_logprobs` exists (a response read left to right)
    requires_weight_form = False  # True: evaluate edits merged into the weights (tied halves a hook cannot reach)
    default_max_new_tokens = 96  # eval.max_new_tokens=null: how much of a response the judge reads (a refusal may come after an opening sentence)
    LAYER_PATHS: tuple[str, ...] = ()  # hints: where the decoder layer list usually is (else found by structure)
    ATTENTION_WRITERS: tuple[str, ...] = ()  # hints, used when writers cannot be traced (a model on `meta`)
    MLP_WRITERS: tuple[str, ...] = ()
    TRACE_WRITERS = False  # find writers by structure: one traced forward (`subspace.families.structure`)
    SKIP_LAYER_LISTS = ("vision", "visual", "audio", "image", "speech", "patch", "mtp")  # towers, not the decoder

    def __init__(self, model: PreTrainedModel, long_prompts: str = "truncate"):
        if long_prompts not in LONG_PROMPT_POLICIES:
            raise ValueError(f"long_prompts={long_prompts!r} must be one of {LONG_PROMPT_POLICIES}: cut the user's text "
                             "to fit the token limit (with a warning), or refuse the prompt")
        self.model, self.long_prompts = model, long_prompts
        self._cut_prompts: set[str] = set()  # warned about once each, not once per batch
        self.layers_path, self.layers = self._find_layers(model)
        self.hidden_size: int = model.config.get_text_config().hidden_size  # composite configs keep it there
        self.num_layers = len(self.layers)
        if self.TRACE_WRITERS:
            _ = self.traces  # now, while the model is whole: before any sharding, hooks or merges

    def _find_layers(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        """The decoder layer list: at a hinted path, else the first `ModuleList` as long as the text config's layer
        count outside vision/audio towers (multimodal wrappers: the language model's layers only)."""
        for path in self.LAYER_PATHS:
            layers = get_submodule(model, path)
            if isinstance(layers, nn.ModuleList):
                return path, layers
        config = model.config.get_text_config()
        count = next((getattr(config, k) for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
                      if isinstance(getattr(config, k, None), int)), None)
        found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count
                 and not any(w in name.lower() for w in self.SKIP_LAYER_LISTS)]
        if found:
            return found[0]
        raise TypeError(f"{type(model).__name__} has no decoder layer list: none at {', '.join(self.LAYER_PATHS)}, "
                        f"and no ModuleList of its {count} layers (config) outside vision/audio towers; "
                        "add a family adapter for it.")

    def check_layer(self, layer: int, what: str = "layer") -> int:
        if not -self.num_layers <= layer < self.num_layers:
            raise ValueError(
                f"{what}={layer} is out of range: this model has {self.num_layers} decoder layers, "
                f"valid indices are 0..{self.num_layers - 1} (or negative from the end)."
            )
        return layer % self.num_layers

    @cached_property
    def traces(self) -> list[LayerTrace] | None:
        """Each layer's residual writers found by structure (one traced forward), or None where the family does not
        trace (`TRACE_WRITERS`) or the model has no data to run (`meta`): then the name hints decide."""
        if not self.TRACE_WRITERS or any(p.is_meta for p in self.model.parameters()):
            return None
        config = self.model.config.get_text_config()
        vocab = getattr(config, "vocab_size", None) or 8
        device = next(self.model.parameters()).device
        ids = (torch.arange(5, device=device)[None] + 3) % vocab
        try:
            traces = trace_layers(self.model, self.layers, self.hidden_size, ids)
        except Exception as err:  # noqa: BLE001 - a forward that needs more than token ids: say so, use the hints
            log.warning("%s: could not trace the residual writers (%s: %s); using the name hints",
                        type(self.model).__name__, type(err).__name__, err)
            return None
        for i, trace in enumerate(traces):
            where = f"{type(self.model).__name__} ({self.model.config.model_type}) layer {i} ({self.layers_path}.{i})"
            if not trace.ran:
                raise TypeError(f"{where} did not run on a text-only forward (a cross-attention or skipped layer): "
                                "its residual writers cannot be found; this architecture is not supported")
            if trace.problems:
                raise TypeError(f"{where} adds to the residual stream through {', '.join(sorted(set(trace.problems)))}, "
                                "which no weight edit of a residual writer covers; this architecture is not supported")
            if not trace.writers:
                raise TypeError(f"{where} writes nothing into the residual stream that a weight holds; "
                                "this architecture is not supported")
        return traces

    @cached_property
    def moe_blocks(self) -> dict[int, MoEBlock]:
        """The mixture-of-experts block of each MoE layer, by layer index (empty for a dense model)."""
        blocks = {}
        for i, layer in enumerate(self.layers):
            block = find_moe_block(layer, self.hidden_size)
            traced = [w for w in self.traces[i].writers if w.stacked] if self.traces is not None else []
            if block is None and traced:
                if len(traced) > 1:
                    raise TypeError(f"layer {i} of {type(self.model).__name__} has several stacked-expert writers "
                                    f"({', '.join(w.name for w in traced)}); only one experts module a layer is supported")
                experts = traced[0].name
                parent = experts.rpartition(".")[0]
                shared = [w.name for w in self.traces[i].writers if not w.stacked and "shared" in w.name
                          and parent and w.name.startswith(f"{parent}.")]
                block = traced_moe_block(layer, experts, shared[0] if len(shared) == 1 else None, self.hidden_size)
            if block is not None:
                blocks[i] = block
        return blocks

    def writer_sites(self, layers: Sequence[int] | None = None,
                     kinds: Sequence[str] = WRITER_KINDS) -> list[WriterSite]:
        """Every residual writer of the given kinds in the chosen layers, in forward order.

        A dense layer's MLP writes through "mlp_out"; a MoE layer's through every expert's down-projection
        ("expert_out": one fused site, or one per ModuleList expert) and its shared expert's ("shared_expert_out"),
        or, if asked for, through the block's combined output ("moe_out"). Token mixers (attention, linear attention,
        Mamba or convolution mixers) write through "attn_out". Found by structure where the family traces
        (`traces`), else by the name hints.
        """
        if unknown := sorted(set(kinds) - set(SITE_KINDS)):
            raise ValueError(f"unknown writer kinds {unknown}; valid kinds are {SITE_KINDS}")
        chosen = range(self.num_layers) if layers is None else [self.check_layer(i) for i in layers]
        if self.traces is not None:
            return [site for i in chosen for site in self._traced_sites(i, kinds)]
        sites: list[WriterSite] = []
        for i in chosen:
            if "attn_out" in kinds:
                sites.append(self._linear_site(i, "attn_out", self.ATTENTION_WRITERS))
            if i in self.moe_blocks:
                sites += self._moe_sites(i, self.moe_blocks[i], kinds)
            elif "mlp_out" in kinds:
                sites.append(self._linear_site(i, "mlp_out", self.MLP_WRITERS))
        return sites

    def _traced_sites(self, i: int, kinds: Sequence[str]) -> list[WriterSite]:
        """Layer i's traced writers in forward order; those of a MoE block (its experts, its shared expert) as the
        block's sites, at the place of the block's first writer."""
        block = self.moe_blocks.get(i)
        under = (lambda name, part: name == part or name.startswith(f"{part}."))  # noqa: E731
        sites: list[WriterSite] = []
        placed = False
        for writer in self.traces[i].writers:
            in_block = block is not None and (under(writer.name, block.experts) or writer.name == block.shared or
                                              (block.shared is not None and under(writer.name, block.shared)))
            if in_block:
                if not placed:
                    sites += [s for s in self._moe_sites(i, block, kinds)]
                    placed = True
                continue
            kind = classify(writer.name)
            if kind in kinds:
                sites.append(WriterSite(f"{self.layers_path}.{i}.{writer.name}", i, kind, after=writer.after))
        return sites

    def _linear_site(self, i: int, kind: str, candidates: Sequence[str]) -> WriterSite:
        rel = next((c for c in candidates if isinstance(get_submodule(self.layers[i], c), nn.Linear)), None)
        if rel is None:
            raise TypeError(f"layer {i} of {type(self.model).__name__} has no {kind} Linear among {candidates}")
        return WriterSite(f"{self.layers_path}.{i}.{rel}", i, kind)

    def _moe_sites(self, i: int, block: MoEBlock, kinds: Sequence[str]) -> list[WriterSite]:
        prefix = f"{self.layers_path}.{i}"
        experts = f"{prefix}.{block.experts}"
        sites = [WriterSite(f"{prefix}.{block.block}", i, "moe_out", experts)] if "moe_out" in kinds else []
        if "expert_out" in kinds:
            sites += [WriterSite(f"{prefix}.{writer}", i, "expert_out", experts, None if block.fused else e)
                      for e, writer in enumerate(block.writers)]
        if "shared_expert_out" in kinds and block.shared is not None:
            sites.append(WriterSite(f"{prefix}.{block.shared}", i, "shared_expert_out"))
        return sites

    def residual_entry(self, site: WriterSite) -> str:
        """The module whose output is what `site`'s sub-layer adds to the residual stream. Pre-norm blocks add a
        writer's output as it is, post-norm blocks its norm's output; a MoE layer's experts reach it through the
        block's combined output."""
        if site.after is not None and site.kind in ("attn_out", "mlp_out") and get_submodule(
                self.layers[site.layer], site.after) is not None:
            return f"{self.layers_path}.{site.layer}.{site.after}"
        if site.kind in ("attn_out", "mlp_out"):
            return site.name
        return f"{self.layers_path}.{site.layer}.{self.moe_blocks[site.layer].block}"

    def recorded_routing(self) -> AbstractContextManager[dict[str, Tensor]]:
        """Records which experts fire on the forwards run inside the block: {experts module name: bool [E]}."""
        return recorded_routing(self.model, {f"{self.layers_path}.{i}": b for i, b in self.moe_blocks.items()})

    @property
    def max_prompt_tokens(self) -> int | None:
        """The longest templated prompt the model's context holds (None when its config does not say)."""
        config = self.model.config.get_text_config()
        return getattr(config, "max_position_embeddings", None) or getattr(config, "max_sequence_length", None)

    def chat_batch(self, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], system_prompt: str | None = None,
                   max_length: int | None = None) -> dict[str, Tensor]:
        """Left-padded chat-templated prompts ending where the response starts, on the model's device.

        A prompt over `max_length` tokens (default: the context) is cut at the end of the user's text, so the
        template and the response header stay, with a warning; or refused, if `long_prompts="error"`.
        """
        if tokenizer.chat_template is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template; set one (tokenizer.chat_template) "
                             "or use an instruct model.")
        if tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad token; set tokenizer.pad_token.")
        limit = max_length or self.max_prompt_tokens
        texts = [self._templated(tokenizer, p, system_prompt) for p in prompts]
        tokenizer.padding_side = "left"
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        if limit is not None and batch["input_ids"].shape[1] > limit:  # only then: re-fit the long prompts
            lengths = batch["attention_mask"].sum(1).tolist()
            texts = [self._fit(tokenizer, p, t, n, system_prompt, limit) if n > limit else t
                     for p, t, n in zip(prompts, texts, lengths)]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.model.device) for k, v in batch.items()}

    def _templated(self, tokenizer: PreTrainedTokenizerBase, prompt: str, system_prompt: str | None) -> str:
        return tokenizer.apply_chat_template(self.messages(prompt, system_prompt), tokenize=False,
                                             add_generation_prompt=True)

    def _fit(self, tokenizer: PreTrainedTokenizerBase, prompt: str, text: str, n: int, system_prompt: str | None,
             limit: int) -> str:
        """`text` (the templated prompt, `n` tokens), its user text cut from the end until it fits `limit` tokens."""
        def length(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        where = f"prompt {prompt[:60]!r}{'…' if len(prompt) > 60 else ''} is {n} tokens templated, over the limit of {limit}"
        if self.long_prompts == "error":
            raise ValueError(f"{where}; shorten it, raise the limit (method.max_length), or set long_prompts=truncate "
                             "to cut it to fit")
        words = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        keep = len(words) - (n - limit)
        while keep > 0 and length(text := self._templated(tokenizer, tokenizer.decode(words[:keep]), system_prompt)) > limit:
            keep -= max(1, length(text) - limit)  # re-tokenising a cut can merge or split a token or two
        if keep <= 0:
            raise ValueError(f"{where}, and the chat template alone does not fit; raise the limit")
        if prompt not in self._cut_prompts:
            self._cut_prompts.add(prompt)
            log.warning("%s: cut to its first %d tokens of user text (long_prompts=truncate)", where, keep)
        return text

    @staticmethod
    def messages(prompt: str, system_prompt: str | None) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return msgs + [{"role": "user", "content": prompt}]

    def stop_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> set[int]:
        """Tokens that end a response: everything after the first is not part of it."""
        return {i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}

    def residuals(self, batch: dict[str, Tensor]) -> Tensor:
        """Residual stream entering each layer where the response is decided: [num_layers, batch, d], float32."""
        raise NotImplementedError

    def response_logprobs(self, batch: dict[str, Tensor]) -> Tensor:
        """log P at the first response position(s): [batch, positions, vocab] float32 (log-softmax)."""
        raise NotImplementedError

    def prefix_logprobs(self, batch: dict[str, Tensor], prefixes: Tensor, share_prompt: bool = True) -> Tensor:
        """log P(prefix | prompt) of each response prefix [R, K] after each prompt, teacher-forced: [batch, R] float32.

        Only a family whose response is read left to right has it (`objective.refusal=prefix`). `share_prompt`: the
        prompts may be read once for all prefixes (false while the layers are checkpointed)."""
        raise NotImplementedError(f"the {self.name} family has no teacher-forced response prefixes "
                                  "(objective.refusal=prefix); use objective.refusal=first_token")

    def answer_logprobs(self, batch: dict[str, Tensor], answers: Tensor) -> tuple[Tensor, Tensor]:
        """log P over the tokens of given answers [batch, N] (-1: no token), teacher-forced: ([batch, P, vocab] float32,
        valid [batch, P] bool). What `kl_response` compares; `kl_response_at` says which positions P are."""
        raise NotImplementedError

    kl_response_at = "the unedited model's own answer, teacher-forced: each of its first N tokens after the ones before"

    def generate(self, tokenizer: PreTrainedTokenizerBase, batch: dict[str, Tensor], max_new_tokens: int) -> Tensor:
        """The model's own sampler, greedy: new token ids [batch, ≤ max_new_tokens]."""
        raise NotImplementedError


MASK_RATIOS = (0.25, 0.5, 0.75, 1.0)
CANVAS_KL_AT = ("the unedited model's own answer on the canvas, its first N positions hidden at mask ratios 1/4, 1/2, "
                "3/4 and 1 (a fixed pattern; hidden positions get the sampler's blank: the mask token or the noise "
                "canvas), predicted at the hidden positions: the states the sampler fills from")


def masked_canvases(answers: Tensor, blank: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The answers [batch, N] (-1: none) as canvases [R, batch, N] with a fixed random share of the first N positions
    replaced by `blank` [N] for each mask ratio R, and which positions were hidden and hold an answer token [R, batch, N]."""
    n = answers.shape[1]
    rank = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(answers.device)
    present = answers >= 0
    filled = torch.where(present, answers, blank[None])
    canvases, hidden = [], []
    for ratio in MASK_RATIOS:
        masked = (rank < max(1, round(ratio * n)))[None].expand_as(answers)
        canvases.append(torch.where(masked, blank[None], filled))
        hidden.append(masked & present)
    return torch.stack(canvases), torch.stack(hidden)


def log_softmax32(logits: Tensor) -> Tensor:
    return torch.log_softmax(logits.float(), dim=-1)
