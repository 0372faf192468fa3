"""Content hashes: of files (caches keyed by what they were made from) and of tensors (checkpoints store them, so a
resumed run can tell that what it recomputed is what it trained on)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_digest(tensor: Tensor) -> str:
    """Content hash of a tensor (dtype, shape and bytes)."""
    t = tensor.detach().cpu().contiguous()
    header = f"{t.dtype}{tuple(t.shape)}".encode()
    return hashlib.sha256(header + t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def combined_digest(label: str, *tensors: Tensor) -> str:
    """One hash for a label and several tensors: each tensor's digest, in order, after the label."""
    parts = [label, *(tensor_digest(t) for t in tensors)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
