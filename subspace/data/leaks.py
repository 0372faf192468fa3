"""Leak checks: no prompt a run reports on may occur among the prompts it was built or tuned on.

Compared up to case, spacing and punctuation (`prompt_key`), so "Write a poem!" and "write a poem" are one prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from subspace.config import shared_data_dir
from subspace.data.loading import builtin_names, load_prompts, prompt_key

PUBLIC_TRAIN = ("prompts/harmful_train", "prompts/harmless_train")
PUBLIC_EVAL = ("prompts/harmful_val", "prompts/harmless_val")
HOLDOUT = ("holdout/harmful_test", "holdout/harmless_test")
# the project's own sets that organisms or edits are fitted or chosen on
BUILTIN_TRAIN = ("harmful_train", "harmless_train", "lookalike_train", "lookalike_train_more", "lookalike_select")


def leaks(eval_sets: Mapping[str, Sequence[str]], train_sets: Mapping[str, Sequence[str]]) -> dict[str, dict[str, int]]:
    """{eval set: {train set: number of its prompts found there}}, only the pairs that share any."""
    keys = {name: {prompt_key(p) for p in prompts} for name, prompts in train_sets.items()}
    found = {}
    for name, prompts in eval_sets.items():
        hits = {train: sum(prompt_key(p) in k for p in prompts) for train, k in keys.items()}
        if hits := {train: n for train, n in hits.items() if n}:
            found[name] = hits
    return found


def public_sets(names: Sequence[str]) -> dict[str, list[str]]:
    """The public splits among `names` that exist under ../shared/data (or $SUBSPACE_SHARED_DATA)."""
    root = shared_data_dir()
    return {name: load_prompts(str(root / f"{name}.json")) for name in names if (root / f"{name}.json").is_file()}


def builtin_sets(names: Sequence[str] = BUILTIN_TRAIN) -> dict[str, list[str]]:
    return {f"builtin:{n}": load_prompts(f"builtin:{n}") for n in names if n in builtin_names()}
