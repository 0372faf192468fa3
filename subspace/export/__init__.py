"""Writing an edit out: PEFT LoRA adapter, merged model."""

from subspace.export.peft_adapter import check_adapter_fits, export_peft_adapter, load_peft_adapter, save_merged_model

__all__ = ["check_adapter_fits", "export_peft_adapter", "load_peft_adapter", "save_merged_model"]
