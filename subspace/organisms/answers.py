"""A model's own greedy answers, the targets organisms learn to keep giving to harmless prompts."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
import transformers

from subspace.evaluation.generation import generate_responses
from subspace.families.causal import CausalFamily
from subspace.models.bundle import ModelBundle
from subspace.utils.io import write_json

log = logging.getLogger(__name__)


def own_answers(model: ModelBundle, fingerprint: dict, prompts: list[str], max_new_tokens: int, batch_size: int,
                cache_dir: str | None = None, desc: str = "answers") -> list[str]:
    """A causal model's greedy answers, cached by (model fingerprint, prompts, settings) under `cache_dir/answers`.

    Generating them takes minutes on a CPU; recipes that change only the fine-tune reuse them.
    """
    blob = json.dumps({"model": fingerprint, "prompts": prompts, "max_new_tokens": max_new_tokens,
                       "batch_size": batch_size, "libs": {m.__name__: m.__version__ for m in (torch, transformers)}},
                      sort_keys=True, default=list)
    path = None if cache_dir is None else (
        Path(cache_dir).expanduser() / "answers" / f"{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json")
    if path is not None and path.exists():
        return json.loads(path.read_text())
    log.info("%s: generating the model's own answers to %d prompts", desc, len(prompts))
    answers = generate_responses(CausalFamily(model.model), model.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, desc=desc)
    if path is not None:
        write_json(path, answers)
    return answers
