"""Writing an edit out: PEFT LoRA adapter, merged model."""

from subspace.export.peft_adapter import export_peft_adapter, save_merged_model

__all__ = ["export_peft_adapter", "save_merged_model"]
