"""Mixture-of-experts layers: where the experts' residual writers live, and which experts routing picked.

Refusal can be written by any expert the router may choose, so an edit must be able to reach every expert
slice, not only the layer's combined output or the experts that happened to fire on a few prompts. Two
layouts are found (the names are those transformers and older custom code use):

- fused (transformers 5: Qwen2/3-MoE, OLMoE, Mixtral, …): `mlp.experts.down_proj`, one 3-D parameter
  `[num_experts, d, intermediate]`; the experts module is called as `experts(hidden, top_k_index, top_k_weights)`;
- a `ModuleList` of experts, each with its own `Linear` down-projection (`mlp.experts.3.down_proj`).

Gemma-4-style layers (DiffusionGemma) hold the experts directly (`experts.down_proj`), beside a dense `mlp`
and a separate `router`: there the experts module is its own block (its output is the experts' whole sum).

A shared expert (Qwen2-MoE `mlp.shared_expert`) runs on every token; its down-projection is a plain writer.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn

MOE_BLOCKS = ("mlp", "block_sparse_moe", "feed_forward")
EXPERT_WRITERS = ("down_proj", "w2", "fc2")
SHARED_EXPERTS = ("shared_expert", "shared_experts")


@dataclass(frozen=True)
class MoEBlock:
    """A decoder layer's mixture-of-experts block; names are relative to the layer."""

    block: str  # its output is the layer's whole MLP contribution (what moe_scope=layer_output projects)
    experts: str  # the module routing calls with top_k_index
    num_experts: int
    fused: bool
    writers: tuple[str, ...]  # fused: the one 3-D parameter; ModuleList: each expert's Linear, in expert order
    shared: str | None = None  # the shared expert's down-projection Linear, if the block has one
    transposed: bool = False  # fused writer stored [experts, in, d] (gpt-oss) instead of [experts, d, in]
    bias: str | None = None  # the fused writer's bias [experts, d] (relative to the layer), if it has one


def _child(module: nn.Module, name: str) -> nn.Module | None:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Module) else None


def _fused_writer(experts: nn.Module) -> str | None:
    """The experts module's 3-D down-projection parameter (its name; layout and bias: `fused_layout`)."""
    return next((n for n in EXPERT_WRITERS if getattr(experts._parameters.get(n), "ndim", 0) == 3), None)


# transformers' experts kernels (eager: the class's own loop; None: standalone module, which falls back to it); each
# returns Σ_e w_e·(W_e h_e) when the module declares no bias and no post-expert norm (read in transformers 5.24)
LINEAR_EXPERTS_IMPLEMENTATIONS = (None, "eager", "batched_mm", "grouped_mm", "deepgemm", "sonicmoe")


def sums_expert_outputs(module: nn.Module, parameter: str | None) -> bool:
    """Whether `module`'s output is exactly Σ_e w_e·(W_e h_e) over its stacked `parameter` W [E, d, in], nothing
    applied or added after W: then `W_e ← (I − λUUᵀ) W_e` for every e equals projecting that output.

    Conservative: only transformers' own fused experts (`@use_experts_implementation` classes, which declare their
    layout), `parameter` their down projection `[E, hidden_dim, in]` (untransposed: rows in the residual stream),
    no bias on it, no post-expert norm, run by one of the library's kernels. Anything else (remote code, custom
    kernels, gpt-oss-style biased experts) is False and keeps the weight edit.
    """
    weight = module._parameters.get(parameter) if parameter else None
    config = getattr(module, "config", None)
    return (weight is not None and parameter == _fused_writer(module) and weight.ndim == 3
            and type(module).__module__.startswith("transformers.models.")
            and getattr(module, "has_bias", True) is False and f"{parameter}_bias" not in module._parameters
            and getattr(module, "is_transposed", True) is False
            and getattr(module, "has_post_expert_norm", True) is False
            and weight.shape[1] == getattr(module, "hidden_dim", None)
            and getattr(config, "_experts_implementation", "unknown") in LINEAR_EXPERTS_IMPLEMENTATIONS)


def fused_layout(experts: nn.Module, name: str, hidden: int | None = None) -> tuple[bool, str | None]:
    """(transposed, bias parameter) of the experts' stacked writer `name`: transposed when the module declares it
    (`is_transposed`, gpt-oss: [experts, in, d]) or, declaring nothing, holds d last and not in the middle (Llama 4);
    the bias `<name>_bias` [experts, d] when the module holds one."""
    bias = f"{name}_bias" if isinstance(experts._parameters.get(f"{name}_bias"), torch.Tensor) else None
    if bias is None and getattr(experts, "has_bias", False):
        raise TypeError(f"{type(experts).__name__} declares expert biases but holds no {name}_bias: the edit would "
                        "miss them")
    declared = getattr(experts, "is_transposed", None)
    shape = experts._parameters[name].shape
    transposed = declared if isinstance(declared, bool) else (hidden is not None and shape[-1] == hidden
                                                                and shape[-2] != hidden)
    return transposed, bias


def _linear_writer(module: nn.Module) -> str | None:
    return next((n for n in EXPERT_WRITERS if isinstance(_child(module, n), nn.Linear)), None)


def find_moe_block(layer: nn.Module, hidden: int | None = None) -> MoEBlock | None:
    """The layer's mixture-of-experts block, or None for a dense layer."""
    for block_name in (*MOE_BLOCKS, ""):  # "": experts held by the layer itself, which are then their own block
        block = _child(layer, block_name) if block_name else layer
        experts = _child(block, "experts") if block is not None else None
        if experts is None:
            continue
        prefix = f"{block_name}.experts" if block_name else "experts"
        if (fused := _fused_writer(experts)) is not None:
            count, writers = getattr(experts, fused).shape[0], (f"{prefix}.{fused}",)
        elif isinstance(experts, nn.ModuleList) and len(experts) and all(_linear_writer(e) for e in experts):
            count, writers = len(experts), tuple(f"{prefix}.{i}.{_linear_writer(e)}" for i, e in enumerate(experts))
        else:
            raise TypeError(f"{type(experts).__name__} at {prefix} is neither fused experts (a 3-D parameter among "
                            f"{EXPERT_WRITERS}) nor a ModuleList of experts with a Linear among {EXPERT_WRITERS}")
        shared = _shared_writer(block, block_name) if block_name else None
        transposed, bias = fused_layout(experts, fused, hidden) if fused is not None else (False, None)
        return MoEBlock(block_name or prefix, prefix, count, fused is not None, writers, shared, transposed,
                        f"{prefix}.{bias}" if bias else None)
    return None


def traced_moe_block(layer: nn.Module, experts_name: str, shared: str | None, hidden: int | None = None) -> MoEBlock:
    """The MoE block around stacked experts found by structure (`subspace.families.structure`), relative names: the
    experts' parent is the block (the experts module itself when the layer holds it), `shared` the shared expert's
    writer if one was found beside them."""
    experts = layer.get_submodule(experts_name)
    stacked = [n for n, p in experts._parameters.items() if isinstance(p, torch.Tensor) and p.ndim == 3]
    name = _fused_writer(experts) or (stacked[-1] if len(stacked) == 1 else None)
    if name is None:
        raise TypeError(f"{type(experts).__name__} at {experts_name} holds stacked weights {stacked}, none of them a "
                        f"known down-projection ({', '.join(EXPERT_WRITERS)})")
    transposed, bias = fused_layout(experts, name, hidden)
    block = experts_name.rpartition(".")[0] or experts_name
    return MoEBlock(block, experts_name, experts._parameters[name].shape[0], True, (f"{experts_name}.{name}",), shared,
                    transposed, f"{experts_name}.{bias}" if bias else None)


def _shared_writer(block: nn.Module, block_name: str) -> str | None:
    """The shared expert's down-projection (relative to the layer); a shared expert without one is refused, since
    an edit would silently miss it."""
    shared = next((s for s in SHARED_EXPERTS if _child(block, s) is not None), None)
    if shared is None:
        return None
    writer = _linear_writer(_child(block, shared))
    if writer is None:
        raise TypeError(f"shared expert {block_name}.{shared} has no Linear among {EXPERT_WRITERS}")
    return f"{block_name}.{shared}.{writer}"


def _top_k_index(args: tuple, kwargs: Mapping) -> Tensor | None:
    """Routing's choice as the experts module receives it: `experts(hidden, top_k_index, top_k_weights)`."""
    for key in ("top_k_index", "router_indices"):
        if key in kwargs:
            return kwargs[key]
    return args[1] if len(args) > 1 and isinstance(args[1], Tensor) else None


@contextmanager
def recorded_routing(model: nn.Module, blocks: Mapping[str, MoEBlock]) -> Iterator[dict[str, Tensor]]:
    """Inside the block, every forward of `model` marks the experts routing picked for a real (unpadded) token.

    `blocks` maps a layer's module name to its MoE block. Yields {experts module name: bool [num_experts]},
    filled in as forwards run. Padding is told apart by the `attention_mask` the model is called with (rows of
    the flattened [batch·seq] hidden states the experts receive).
    """
    experts = {f"{layer}.{b.experts}": (model.get_submodule(f"{layer}.{b.experts}"), b.num_experts)
               for layer, b in blocks.items()}
    fired = {name: torch.zeros(count, dtype=torch.bool) for name, (_, count) in experts.items()}
    token_mask: list[Tensor | None] = [None]
    called: set[str] = set()
    runs = [0]

    def read_mask(_module: nn.Module, _args: tuple, kwargs: dict) -> None:
        runs[0] += 1
        mask = kwargs.get("attention_mask")
        token_mask[0] = mask.reshape(-1).bool() if isinstance(mask, Tensor) and mask.ndim == 2 else None

    def record(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            index = _top_k_index(args, kwargs)
            if index is None:
                raise TypeError(f"{name} ({type(module).__name__}) was not called with top_k_index, so the experts "
                                "that fired cannot be read")
            called.add(name)
            mask = token_mask[0]
            if mask is not None and mask.numel() == index.shape[0]:
                index = index[mask.to(index.device)]
            index = index.reshape(-1).cpu()
            fired[name][index[(index >= 0) & (index < len(fired[name]))]] = True
        return hook

    handles = [model.register_forward_pre_hook(read_mask, with_kwargs=True)]
    try:
        handles += [m.register_forward_pre_hook(record(n), with_kwargs=True) for n, (m, _) in experts.items()]
        yield fired
    finally:
        for handle in handles:
            handle.remove()
    if runs[0] and (missing := sorted(set(experts) - called)):
        raise TypeError(f"the model ran but never called {missing[0]} as a whole (the block calls its experts one "
                        "by one), so the experts that fired cannot be read from it")
