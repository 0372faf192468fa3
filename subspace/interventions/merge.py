"""Weight-form edits merged in place for a block and restored bit-exactly after, each shared tensor touched once.

Names are parameter names as `model.named_parameters(remove_duplicate=False)` spells them
(`"model.layers.0.mlp.WRITER.weight"`, `"lm_head.weight"`), so a tied alias is a valid name.
Tensors are identified by their storage (and view in it), not their name: a tied embedding/LM head, or modules
shared between an encoder and a decoder, are one tensor however many names reach it, and a delta
is added to it once. Naming both halves with equal deltas applies it once; with different deltas
is refused (summing them is rarely what was meant, and silently picking one is worse).

Originals are kept as clones and copied back (never subtracted: `(w + d) − d ≠ w` in bf16), on
exit, on error and on KeyboardInterrupt. While a model is inside `merged_deltas`, entering it again
on that model (or on any model sharing one of its parameters, e.g. a PEFT wrapper) is refused: the
second merge would stack on the first.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

SHARDED_MERGE = ("a delta can only be merged into a whole tensor: use eval.apply=hooks (the edit on activations), "
                 "or trainer=ddp where the model fits one device")
_ACTIVE: set[int] = set()  # storage pointers currently merged, across all models
_ACTIVE_LOCK = threading.Lock()


@dataclass
class _Target:
    """One distinct tensor to edit, the names that reach it and its (float32, on-device) delta."""

    param: nn.Parameter
    names: list[str]
    delta: Tensor


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _view_key(t: Tensor) -> tuple:
    """Same storage and same view ⇒ same tensor (two views of one storage at different offsets are not)."""
    return _storage(t), t.storage_offset(), tuple(t.shape), t.stride()


def _resolve(params: Mapping[str, nn.Parameter], name: str, delta: Tensor) -> nn.Parameter:
    """The parameter called `name`, checked against the delta's shape."""
    if name not in params:
        valid = ", ".join(list(params)[:4])
        raise ValueError(f"unknown parameter {name!r}; valid names are parameter names such as {valid}, … "
                         f"({len(params)} in all)")
    param = params[name]
    if isinstance(param, DTensor):
        raise ValueError(f"{name!r} is sharded over several processes (trainer=fsdp): {SHARDED_MERGE}")
    if tuple(delta.shape) != tuple(param.shape):
        raise ValueError(f"delta for {name!r} has shape {tuple(delta.shape)}, "
                         f"expected the parameter's {tuple(param.shape)}")
    return param


def _targets(model: nn.Module, deltas: Mapping[str, Tensor]) -> list[_Target]:
    """Deltas grouped by the tensor they edit; equal deltas for one tensor collapse, different ones are refused."""
    params = dict(model.named_parameters(remove_duplicate=False))
    targets: dict[tuple, _Target] = {}
    for name, delta in deltas.items():
        param = _resolve(params, name, delta)
        delta = delta.detach().to(param.device, torch.float32)
        seen = targets.get(_view_key(param))
        if seen is None:
            targets[_view_key(param)] = _Target(param, [name], delta)
        elif torch.equal(seen.delta, delta):
            seen.names.append(name)
        else:
            raise ValueError(f"{seen.names[0]!r} and {name!r} are one shared tensor but were given different deltas; "
                             "give the delta once (under either name)")
    return list(targets.values())


def _claim(model: nn.Module) -> set[int]:
    """Mark the model's storages as merged; refuse if any already is (merging twice would double-apply)."""
    storages = {_storage(p) for p in model.parameters()} - {0}  # 0: empty or meta tensors, nothing to protect
    with _ACTIVE_LOCK:
        if storages & _ACTIVE:
            raise RuntimeError(f"{type(model).__name__} is already inside merged_deltas (some of its parameters are "
                               "merged); nesting would apply the deltas twice — leave the outer block first")
        _ACTIVE.update(storages)
    return storages


def _release(storages: set[int]) -> None:
    with _ACTIVE_LOCK:
        _ACTIVE.difference_update(storages)


@contextmanager
def merged_deltas(model: nn.Module, deltas: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    """`W ← W + Δ` (in float32, cast back to W's dtype) for each named parameter inside the block; `W` exactly after.

    Costs a clone and a float32 delta of every edited tensor, on its own device, while the block runs.
    """
    targets = _targets(model, deltas)
    storages = _claim(model)
    originals: list[Tensor] = []
    try:
        with torch.no_grad():
            originals = [t.param.detach().clone() for t in targets]  # all before any write: views may overlap
            for t in targets:
                t.param.copy_((t.param.float() + t.delta).to(t.param.dtype))
        yield model
    finally:
        try:
            with torch.no_grad():
                for t, original in reversed(list(zip(targets, originals))):
                    t.param.copy_(original)
        finally:
            _release(storages)
