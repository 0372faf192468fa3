"""Activation checkpointing of the frozen model's decoder layers (`method.gradient_checkpointing=true`).

Each layer keeps only its input for backward and runs again when the gradient reaches it. Non-reentrant
`torch.utils.checkpoint`, because no weight of the frozen model requires a gradient: the recomputation runs the
projection hooks again, so the gradient still reaches the subspace. Done here rather than with transformers'
`gradient_checkpointing_enable`, which acts only in training mode (the frozen model stays in eval mode) and not on
the project's own LLaDA class.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterator

from torch import nn
from torch.utils.checkpoint import checkpoint


@contextmanager
def checkpointed_layers(layers: nn.ModuleList, enabled: bool = True) -> Iterator[None]:
    """Inside the block every layer's forward is checkpointed (unless not `enabled`); after it, however it ends, the
    layers are as before."""
    if not enabled:
        yield
        return
    own = [layer.__dict__.get("forward") for layer in layers]  # a forward set on the instance, kept as it was
    try:
        for layer in layers:
            layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = forward
