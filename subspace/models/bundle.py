"""A loaded model with its tokenizer and where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class ModelBundle:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    source: dict = field(default_factory=dict)  # what the weights depend on (paths, hashes), recorded per run
    family_options: dict = field(default_factory=dict)  # settings for the family adapter (diffusion canvas, sampler)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    valid = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in valid:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(valid)}")
    return valid[dtype]


def load_pretrained(pretrained: str, *, dtype: str = "float32", device: str = "cpu", name: str | None = None,
                    trust_remote_code: bool = False) -> ModelBundle:
    """A Hugging Face model id or local directory; fails with how to get it when it is not there."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=resolve_dtype(dtype),
                                                     trust_remote_code=trust_remote_code)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load model {pretrained!r}: {err}\nDownload it (`huggingface-cli download {pretrained}`) on a "
            f"machine with hub access, or pass a local copy with model.pretrained=DIR."
        ) from err
    return frozen_bundle(model, tokenizer, name or Path(pretrained).name, {"pretrained": str(pretrained)}, device)


def resolve_device(device: str) -> str:
    """"auto": the GPU when there is one, else the CPU."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def frozen_bundle(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, source: dict, device: str,
                  family: Mapping[str, Any] | None = None) -> ModelBundle:
    """A loaded model made ready for the project: on its device, eval mode, no gradients (only a subspace or an
    adapter ever trains), and a pad token (EOS when the tokenizer has none) for batched prompts."""
    model.to(resolve_device(device)).eval().requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return ModelBundle(model, tokenizer, name, source, dict(family or {}))
