"""A projection edit is exactly a rank-k LoRA (`B = −λU`, `A = UᵀW`, `lora_alpha = r`): write it in PEFT's format."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn

from subspace.interventions.edit import ProjectionEdit
from subspace.utils.io import atomic_dir


def export_peft_adapter(edit: ProjectionEdit, model: nn.Module, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Adapter directory loadable with `PeftModel.from_pretrained(base, out_dir)`; the model is not modified.

    Written to a temporary sibling and renamed, so a half-written adapter never exists.
    """
    dtype = next(model.parameters()).dtype
    task_type = "CAUSAL_LM" if getattr(model, "can_generate", lambda: False)() else None  # diffusion models: plain PeftModel
    config = LoraConfig(r=edit.rank, lora_alpha=edit.rank, target_modules=list(edit.sites), lora_dropout=0.0,
                        bias="none", task_type=task_type, base_model_name_or_path=base_model)
    tensors = {}
    for site, (a, b) in edit.lora_factors(model).items():
        tensors[f"base_model.model.{site}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"base_model.model.{site}.lora_B.weight"] = b.to(dtype).contiguous()
    with atomic_dir(out_dir) as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return Path(out_dir)


@torch.no_grad()
def save_merged_model(edit: ProjectionEdit, model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """A plain transformers checkpoint with `W ← W + B A` applied to a copy (the loaded model is untouched)."""
    merged = copy.deepcopy(model)
    for site, (a, b) in edit.lora_factors(model).items():
        weight = merged.get_submodule(site).weight
        weight.copy_((weight.float() + b @ a).to(weight.dtype))
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
