"""Prompt data: loaders with precise errors, the run's prompt sets, the Lightning datamodule."""

from subspace.data.loading import PromptDataError, load_prompts
from subspace.data.prompt_sets import PromptSets

__all__ = ["PromptDataError", "PromptSets", "load_prompts"]
