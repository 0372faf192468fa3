"""Loading DiffusionGemma (google/diffusiongemma-26B-A4B-it) with transformers' own `diffusion_gemma` classes.

Only local weights are used: `model.pretrained=DIR`, or a copy already in the Hugging Face cache. The hub is
never asked (`local_files_only`), so without the weights the run stops at once with how to get them, instead
of starting a 50 GB download or waiting on a network this machine may not have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from transformers import AutoTokenizer

from subspace.models.bundle import ModelBundle, frozen_bundle, resolve_dtype

DIFFUSION_GEMMA_ID = "google/diffusiongemma-26B-A4B-it"
# An estimate from the parameter count (26B total, ~4B active per token), not a measured figure.
DIFFUSION_GEMMA_NEEDS = ("about 52 GB of disk (26B parameters in bfloat16; an estimate) and about as much GPU memory "
                         "to load and sample, more to train")


def _missing(model_id: str, why: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{why}.\nDiffusionGemma weights are not downloaded by this project. Get them on a machine with hub access: "
        f"`huggingface-cli download {model_id}` (it needs {DIFFUSION_GEMMA_NEEDS}; the model may require accepting "
        f"its licence on the hub first), then run again, or pass a local copy with model.pretrained=DIR."
    )


def local_checkpoint(model_id: str = DIFFUSION_GEMMA_ID, pretrained: str | None = None) -> Path:
    """The directory holding the checkpoint: `pretrained`, else the cached snapshot of `model_id` (no network)."""
    if pretrained is not None:
        path = Path(pretrained).expanduser()
        if not (path / "config.json").is_file():
            raise _missing(model_id, f"model.pretrained={pretrained!r} has no config.json: it is not a local copy of "
                                     f"{model_id}")
        return path
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(model_id, local_files_only=True))
    except Exception as err:  # not in the cache (or the cache is unreadable): never fall back to the network
        raise _missing(model_id, f"{model_id!r} is not in the Hugging Face cache ({type(err).__name__})") from err
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise _missing(model_id, f"the cached snapshot {path} of {model_id!r} is incomplete (no config.json or "
                                 "no safetensors weights)")
    return path


def load_diffusion_gemma(model_id: str = DIFFUSION_GEMMA_ID, pretrained: str | None = None, *, dtype: str = "bfloat16",
                         device: str = "auto", name: str | None = None,
                         family: Mapping[str, Any] | None = None) -> ModelBundle:
    """`DiffusionGemmaForBlockDiffusion` and its tokenizer from local weights; `family` configures the adapter."""
    from transformers import DiffusionGemmaForBlockDiffusion

    path = local_checkpoint(model_id, pretrained)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=resolve_dtype(dtype), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return frozen_bundle(model, tokenizer, name or Path(model_id).name, {"pretrained": str(path), "model_id": model_id},
                         device, family)
