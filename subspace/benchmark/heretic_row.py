"""The heretic row: the organism saved as a plain Hugging Face directory, heretic run on it as a separate
process (`subspace.baselines.heretic`), each model it offers scored on the selection split, one picked by
`pick_point`, and that one measured on the eval split by this project's evaluator, like every other row."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from subspace.baselines.heretic import DEFAULT_PYTHON, run_heretic
from subspace.benchmark.choice import REFUSAL_BUDGET, pick_point
from subspace.benchmark.peer import causal_only, eval_split_numbers, evaluator_for, kl_between, save_organism
from subspace.benchmark.rows import Row
from subspace.evaluation.evaluator import Evaluator

log = logging.getLogger(__name__)


@dataclass
class HereticSettings:
    python: str = str(DEFAULT_PYTHON)
    trials: int = 8
    timeout_s: float = 3600.0
    refusal_budget: float = REFUSAL_BUDGET


def unsupported(organism: str, family_name: str) -> Row | None:
    """The heretic row for a model heretic cannot load (it reads causal LMs only), saying why; None if it can."""
    return causal_only(organism, family_name, "heretic")


def template_system_prompt(tokenizer) -> str | None:
    """The system text a chat template inserts when a conversation has none (SmolLM2's "You are a helpful AI
    assistant named SmolLM…"), found by rendering with and without a marker system turn; None if it adds none.
    heretic always sends a system turn, so it is given this text to see the prompts this project's rows see."""
    def render(messages: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    marker, user = "\x00system-marker\x00", [{"role": "user", "content": "x"}]
    plain, marked = render(user), render([{"role": "system", "content": marker}, *user])
    before, _, after = marked.partition(marker)
    if plain.startswith(before) and plain.endswith(after) and len(plain) > len(before) + len(after):
        return plain[len(before): len(plain) - len(after)]
    return None


def heretic_row(organism: str, evaluator: Evaluator, data, work_dir: Path, settings: HereticSettings,
                before: dict[str, float]) -> Row:
    """`before` holds the organism's eval-split refusal rates (shared with the other rows' runs)."""
    command = f"heretic-llm 1.4 via subspace.baselines.heretic, {settings.trials} trials"
    start = time.time()
    model_dir = save_organism(evaluator, work_dir)
    result = run_heretic(model_dir, work_dir / "heretic", harmful_train=data["train_harmful"],
                         harmless_train=data["train_harmless"], harmful_eval=data["select_harmful"],
                         harmless_eval=data["select_harmless"], trials=settings.trials,
                         system_prompt=evaluator.system_prompt or template_system_prompt(evaluator.bundle.tokenizer),
                         python=Path(settings.python), timeout_s=settings.timeout_s,
                         extra_config={"max_response_length": evaluator.max_new_tokens})
    if result.error or not result.models:
        return Row(organism, "heretic", command, before["refusal_rate"], wall_s=time.time() - start,
                   note=result.error or "heretic saved no model")
    select_reference = evaluator.logprobs(data["select_harmless"])
    candidates, rates, kls = [], [], []
    for path in result.models:
        candidates.append(evaluator_for(path, evaluator, "heretic"))
        rates.append(candidates[-1].refusals(data["select_harmful"], desc=f"select {path.name}")[0])
        kls.append(kl_between(select_reference, candidates[-1], data["select_harmless"]))
        log.info("heretic model %s: select refusal %.3f, select KL %.3f", path.name, rates[-1], kls[-1])
    final = pick_point(candidates, rates, kls, settings.refusal_budget)
    chosen = Path(final.bundle.source["pretrained"])
    del candidates  # only the chosen model stays loaded
    numbers = eval_split_numbers(final, evaluator, data, "heretic")
    return Row(organism, "heretic", command, before["refusal_rate"], wall_s=time.time() - start,
               trials_or_steps=f"{result.trials} trials, {len(result.models)} on its front",
               note=f"picked {chosen.name} of {len(rates)} by select split (refusal budget {settings.refusal_budget})",
               **numbers)
