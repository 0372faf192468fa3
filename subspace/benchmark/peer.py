"""What the peer rows (heretic, abliterix) share: the organism saved for the peer's own process, the organism's
refusal rate before (shared with the other rows), an evaluator with this project's settings on the model a peer
saved, and that model's numbers on the eval split."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM

from subspace.benchmark.rows import Row
from subspace.evaluation.evaluator import Evaluator
from subspace.evaluation.metrics import ResponseKL
from subspace.families import family_for
from subspace.models.bundle import ModelBundle


def causal_only(organism: str, family_name: str, method: str, command: str = "—") -> Row | None:
    """The row of a peer that loads causal LMs only (AutoModelForCausalLM), saying why it cannot run on a model of
    another family; None for a causal one."""
    if family_name == "causal":
        return None
    return Row(organism, method, command, note=f"{method} loads causal language models only (AutoModelForCausalLM); "
               f"{organism} is a {family_name} model")


def save_organism(evaluator: Evaluator, work_dir: Path) -> Path:
    """The organism as a plain Hugging Face directory (model and tokenizer), which a peer's process loads."""
    model_dir = Path(work_dir) / "organism_hf"
    evaluator.bundle.model.save_pretrained(model_dir)
    evaluator.bundle.tokenizer.save_pretrained(model_dir)
    return model_dir


def before_rates(rows: Sequence[Row], evaluator: Evaluator, data) -> dict[str, float]:
    """The organism's eval-split refusal rate: a measured row's, else measured here once."""
    measured = [r for r in rows if r.refusal_before is not None]
    if measured:
        return {"refusal_rate": measured[0].refusal_before}
    return {"refusal_rate": evaluator.refusals(data["eval_harmful"], desc="harmful before")[0]}


def evaluator_for(model_dir: Path, like: Evaluator, method: str = "heretic") -> Evaluator:
    """An evaluator with all of `like`'s settings, on another model (same tokenizer)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=like.bundle.model.dtype).eval()
    bundle = ModelBundle(model, like.bundle.tokenizer, f"{method}:{Path(model_dir).name}",
                         {"pretrained": str(model_dir)})
    return replace(like, bundle=bundle, family=family_for(model, like.family.long_prompts))


def kl_between(reference: torch.Tensor, other: Evaluator, prompts: Sequence[str]) -> float:
    metric = ResponseKL()
    metric.update(reference, other.logprobs(prompts))
    return float(metric.compute())


def eval_split_numbers(edited: Evaluator, organism: Evaluator, data, method: str) -> dict[str, float | int]:
    """The edited model on the eval split as every row is reported: harmful and harmless refusal rates, KL against
    the organism, and the prompt counts (Row's keyword arguments)."""
    harmful, _, _ = edited.refusals(data["eval_harmful"], desc=f"{method} harmful")
    harmless, _, _ = edited.refusals(data["eval_harmless"], desc=f"{method} harmless")
    kl = kl_between(organism.logprobs(data["eval_harmless"]), edited, data["eval_harmless"])
    return {"refusal_after": harmful, "harmless_refusal_after": harmless, "kl": kl,
            "n_harmful": len(data["eval_harmful"]), "n_harmless": len(data["eval_harmless"])}
