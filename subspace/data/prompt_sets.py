"""The four prompt sets of a run, with a selection split carved from the training sets."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from subspace.data.loading import PromptDataError, check_overlap, load_prompts, shared_prompts

log = logging.getLogger(__name__)


@dataclass
class PromptSets:
    """Train on `train_*`, choose layers/checkpoints on `select_*`, report on `eval_*`.

    `select_*` are the last `n_select` prompts of each training set, held back from fitting
    so that no choice is ever tuned on the prompts a run reports.
    """

    train_harmful: Any
    train_harmless: Any
    eval_harmful: Any
    eval_harmless: Any
    n_select: int = 32
    train_limit: int | None = None
    eval_harmless_limit: int | None = 100
    eval_harmful_limit: int | None = None
    column: str = "instruction"
    prompts: dict[str, list[str]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        load = lambda src, name, limit: load_prompts(src, column=self.column, limit=limit, name=name)  # noqa: E731
        harmful = load(self.train_harmful, "data.train_harmful", None)
        harmless = load(self.train_harmless, "data.train_harmless", None)
        for name, prompts in (("data.train_harmful", harmful), ("data.train_harmless", harmless)):
            if len(prompts) <= self.n_select + 1:
                raise PromptDataError(f"{name} has {len(prompts)} prompts; it needs more than data.n_select="
                                      f"{self.n_select} + 1 (the last n_select are held back for selection)")
        fit = lambda p: p[: -self.n_select] if self.n_select else p  # noqa: E731
        self.prompts = {
            "train_harmful": fit(harmful)[: self.train_limit],
            "train_harmless": fit(harmless)[: self.train_limit],
            "select_harmful": harmful[-self.n_select:] if self.n_select else [],
            "select_harmless": harmless[-self.n_select:] if self.n_select else [],
            "eval_harmful": load(self.eval_harmful, "data.eval_harmful", self.eval_harmful_limit),
            "eval_harmless": load(self.eval_harmless, "data.eval_harmless", self.eval_harmless_limit),
        }
        check_overlap(self.prompts["train_harmful"], self.prompts["train_harmless"])
        for split in ("harmful", "harmless"):
            leaked = shared_prompts(self.prompts[f"eval_{split}"], harmful + harmless)
            if leaked:
                log.warning("%d eval_%s prompts also appear in the training sets (case, spacing and punctuation "
                            "ignored)", len(leaked), split)

    def categories(self, key: str) -> list[str | None] | None:
        """The `category` field of each prompt of an eval set read from a JSON/JSONL file of records, else None."""
        source = getattr(self, key)
        source = OmegaConf.to_container(source) if OmegaConf.is_config(source) else source
        path, skip = (source.get("path"), source.get("skip", 0)) if isinstance(source, dict) else (source, 0)
        if not isinstance(path, str) or not path.endswith((".json", ".jsonl")) or not Path(path).is_file():
            return None
        text = Path(path).read_text()
        records = json.loads(text) if path.endswith(".json") else [json.loads(line) for line in text.splitlines() if line.strip()]
        cats = [r.get("category") if isinstance(r, dict) else None for r in records][skip:]
        cats = cats[: len(self.prompts[key])]
        return cats if len(cats) == len(self.prompts[key]) and any(c is not None for c in cats) else None

    def __getitem__(self, key: str) -> list[str]:
        return self.prompts[key]

    def fingerprint(self) -> dict[str, Any]:
        """Sources, counts and content hashes, recorded with every result."""
        return {
            key: {"n": len(p), "sha256": hashlib.sha256("\n".join(p).encode()).hexdigest()[:16]}
            for key, p in self.prompts.items()
        } | {"sources": {k: str(getattr(self, k)) for k in ("train_harmful", "train_harmless", "eval_harmful", "eval_harmless")}}
