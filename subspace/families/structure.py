"""Residual writers found from the model itself: one traced forward, read backwards from each layer's output.

A decoder layer's residual writers are the modules whose output is added to the residual stream. Names differ
between architectures (`o_proj`, `c_proj`, `dense`, `out_proj`, `fc2`, `dense_4h_to_h`, a Mamba mixer's
`out_proj`, fused experts' `down_proj`, …) and so do the blocks around them (parallel attention and MLP, post-norm,
hybrid stacks, shared experts), so they are found by structure instead:

1. one short forward of the whole model with each layer's input made a fresh leaf that requires grad (the model's
   weights stay frozen), and a hook on every module of the layers recording the autograd node of its output;
2. from each layer's output node, the graph is walked back through the operations that keep a writer's output as it
   is up to a per-token scalar (additions, reshapes, dtype casts, a product with a per-token gate or a constant),
   through norms and per-channel scales that sit after a writer (post-norm blocks: noted on the writer), down to
   either the layer's input (the residual itself) or a module that holds a weight: a `Linear` or look-alike with a
   2-D weight (`Conv1D` included, transposed), or stacked experts (a 3-D parameter);
3. any other operation on such a path (a product of two activations, a non-linearity) means the layer adds
   something no weight edit covers: the layer is refused with the operation named, never edited in part.

Names are only hints here: which module is a writer comes from the graph; the kinds (attention or other token mixer
vs MLP) come from where the writer sits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import Tensor, nn

# autograd nodes a writer's output may pass through on its way into the residual stream, unchanged up to layout
PASS_THROUGH = ("AddBackward", "ViewBackward", "UnsafeViewBackward", "ReshapeAliasBackward", "CloneBackward",
                "ToCopyBackward", "SqueezeBackward", "UnsqueezeBackward", "TransposeBackward", "PermuteBackward",
                "ExpandBackward", "AliasBackward", "IndexAddBackward", "SliceBackward", "SelectBackward",
                "AsStridedBackward", "StackBackward", "SumBackward", "CatBackward", "SplitBackward",
                "SplitWithSizesBackward", "UnbindBackward", "IndexPutBackward", "IndexBackward", "ScatterAddBackward",
                "NarrowBackward", "ContiguousBackward", "LiftFreshBackward", "ViewAsRealBackward",
                "ViewAsComplexBackward", "UnsafeSplitBackward", "NegBackward")
SCALED = ("MulBackward", "DivBackward")  # fine by a per-token scalar; a per-channel vector is a scale (post-norm)
MLP_WORDS = ("mlp", "ffn", "feed_forward", "feedforward", "moe", "expert", "fc1", "fc2", "fc_out", "dense_4h",
             "c_fc", "channel_mix", "w2", "down_proj")


@dataclass
class TracedWriter:
    """A residual writer of one layer, relative to the layer: `name` a module (a 2-D weight) or, for stacked
    experts, the experts module (`stacked`). `after` names the norm or per-channel scale between it and the residual
    stream (post-norm), if any; `order` is its place in the forward."""

    name: str
    order: int
    stacked: bool = False
    after: str | None = None
    kind: str = ""


@dataclass
class LayerTrace:
    writers: list[TracedWriter] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # paths into the residual stream no writer explains
    ran: bool = False


def is_norm(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "norm" in name and not any(isinstance(p, Tensor) and p.ndim > 1 for p in module.parameters(recurse=False))


def holds_weight(module: nn.Module) -> bool:
    """A leaf writer: a 2-D `weight` (Linear, Conv1D and look-alikes) or stacked experts (a direct 3-D parameter)."""
    if isinstance(module, nn.Embedding):
        return False
    weight = module._parameters.get("weight")
    return (isinstance(weight, Tensor) and weight.ndim == 2) or any(  # [1, 1, d] mixing coefficients are no experts
        isinstance(p, Tensor) and p.ndim == 3 and p.shape[0] > 1 for p in module._parameters.values())


def _first_tensor(args: tuple, kwargs: dict, hidden: int | None = None) -> Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and value.is_floating_point() and (hidden is None or value.shape[-1] == hidden):
            return value
    return None


def _out_tensor(output) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return getattr(output, "last_hidden_state", None) if not isinstance(output, (tuple, list)) else None


def trace_layers(model: nn.Module, layers: nn.ModuleList, hidden: int, input_ids: Tensor) -> list[LayerTrace]:
    """Each layer's residual writers, found by one forward of `model` on `input_ids` (see the module docstring)."""
    outputs: dict[int, list[tuple[str, int, nn.Module]]] = {}  # id(output node) → modules producing it
    inputs: dict[str, object] = {}  # module name (within a layer) → its input's node, for norms
    layer_io: dict[int, tuple[object, object]] = {}
    order = [0]
    handles = []
    names = {i: {id(m): n for n, m in layer.named_modules() if n} for i, layer in enumerate(layers)}

    def make_leaf(i: int):
        def pre(_module, args, kwargs):
            if i in layer_io:
                return None
            target = _first_tensor(args, kwargs, hidden)
            if target is None:
                return None
            leaf = target.detach().requires_grad_(True)
            layer_io[i] = (leaf, None)
            args = tuple(leaf if a is target else a for a in args)
            kwargs = {k: (leaf if v is target else v) for k, v in kwargs.items()}
            return args, kwargs
        return pre

    def read_out(i: int):
        def post(_module, _args, _kwargs, output):
            leaf, seen = layer_io.get(i, (None, None))
            out = _out_tensor(output)
            if leaf is not None and seen is None and out is not None:
                layer_io[i] = (leaf, out.grad_fn)
        return post

    def record(i: int, name: str):
        def pre(_module, args, kwargs):
            tensor = _first_tensor(args, kwargs)
            if tensor is not None and f"{i}.{name}" not in inputs:
                inputs[f"{i}.{name}"] = tensor.grad_fn
        def post(module, _args, output):
            out = _out_tensor(output)
            order[0] += 1
            if out is not None and out.grad_fn is not None:
                outputs.setdefault(id(out.grad_fn), []).append((name, order[0], module))
        return pre, post

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(make_leaf(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(read_out(i), with_kwargs=True))
            for name, module in layer.named_modules():
                if name:
                    pre, post = record(i, name)
                    handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                    handles.append(module.register_forward_hook(post))
        was_training = model.training
        model.eval()  # dropout off: the graph is the one the edit meets at inference
        try:
            with torch.enable_grad():
                model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
                traces = [_walk(i, layer_io.get(i), outputs, inputs, names[i]) for i in range(len(layers))]
        finally:
            model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return traces


def _walk(i: int, io, outputs, inputs, layer_names: dict[int, str]) -> LayerTrace:
    trace = LayerTrace()
    if io is None or io[1] is None:
        return trace
    trace.ran = True
    found: dict[str, TracedWriter] = {}
    stack: list[tuple[object, str | None]] = [(io[1], None)]
    seen: set[tuple[int, str | None]] = set()
    while stack:
        node, after = stack.pop()
        if node is None or (id(node), after) in seen:
            continue
        seen.add((id(node), after))
        kind = type(node).__name__
        if kind == "AccumulateGrad":
            continue  # the layer's input (the residual stream itself), or a trainable weight
        producers = [p for p in outputs.get(id(node), []) if id(p[2]) in layer_names]
        writer = max((p for p in producers if holds_weight(p[2])), key=lambda p: p[0].count("."), default=None)
        if writer is not None:
            name, order, module = writer
            if name not in found:
                found[name] = TracedWriter(name, order, stacked=module._parameters.get("weight") is None
                                           or module._parameters["weight"].ndim != 2, after=after)
            continue
        norm = next((p for p in producers if is_norm(p[2])), None)
        if norm is not None:  # a norm after a writer: walk on from its input, noting it
            stack.append((inputs.get(f"{i}.{norm[0]}"), after or norm[0]))
            continue
        if kind.startswith(SCALED):
            stack += _scaled_inputs(node, after, producers, trace)
            continue
        if not kind.startswith(PASS_THROUGH):
            where = f" (the output of {producers[0][0]})" if producers else ""
            trace.problems.append(f"{kind.removesuffix('0').removesuffix('1')}{where}")
            continue
        stack += [(fn, after) for fn, _ in node.next_functions]
    trace.writers = sorted(found.values(), key=lambda w: w.order)
    return trace


def _scaled_inputs(node, after: str | None, producers, trace: LayerTrace) -> Iterable[tuple[object, str | None]]:
    """A product or quotient: walk on through the operand that carries the writer's output when the other factor is a
    per-token scalar (or a constant: then a per-channel one is a scale, noted like a norm); else it is a problem."""
    saved = {0: getattr(node, "_saved_other", None), 1: getattr(node, "_saved_self", None)}
    nexts = [fn for fn, _ in node.next_functions]
    live = [k for k, fn in enumerate(nexts) if fn is not None]
    if len(live) == 1:
        k = live[0]
        other = saved.get(k)
        scale = isinstance(other, Tensor) and other.numel() > 1 and other.shape[-1] > 1
        return [(nexts[k], (after or f"{type(node).__name__} by a per-channel vector") if scale else after)]
    steps = []
    for k in live:
        other = saved.get(k)
        if isinstance(other, Tensor) and (other.numel() == 1 or other.shape[-1] == 1):
            steps.append((nexts[k], after))  # k carries the activations; the other factor is a per-token gate
    if len(steps) != 1:
        trace.problems.append(f"{type(node).__name__.removesuffix('0')} of two activations")
        return []
    return steps


def classify(name: str, experts: Iterable[str] = (), shared: Iterable[str] = ()) -> str:
    """The writer's kind from where it sits in the layer (relative name)."""
    if any(name == e or name.startswith(f"{e}.") for e in experts):
        return "expert_out"
    if any(name == s or name.startswith(f"{s}.") for s in shared):
        return "shared_expert_out"
    lowered = name.lower()
    return "mlp_out" if any(w in lowered for w in MLP_WORDS) else "attn_out"
