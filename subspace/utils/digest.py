"""Content hashes that checkpoints store, so a resumed run can tell that what it recomputed is what it trained on."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def tensor_digest(tensor: Tensor) -> str:
    """Content hash of a tensor (dtype, shape and bytes)."""
    t = tensor.detach().cpu().contiguous()
    header = f"{t.dtype}{tuple(t.shape)}".encode()
    return hashlib.sha256(header + t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def combined_digest(label: str, *tensors: Tensor) -> str:
    """One hash for a label and several tensors: each tensor's digest, in order, after the label."""
    parts = [label, *(tensor_digest(t) for t in tensors)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
