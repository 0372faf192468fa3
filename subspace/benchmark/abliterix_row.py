"""The abliterix row: the organism saved as a plain Hugging Face directory, abliterix run on it headless at its
defaults as a separate process (`subspace.baselines.abliterix`, the selection split as its evaluation prompts), and
the one model it exports measured on the eval split by this project's evaluator, like every other row. abliterix
exports one model (its trial with the fewest refusals, then the lowest KL), so there is no pick among points."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from subspace.baselines.abliterix import ABLITERIX_VERSION, DEFAULT_TRIALS, default_python, run_abliterix
from subspace.benchmark.peer import causal_only, eval_split_numbers, evaluator_for, save_organism
from subspace.benchmark.rows import Row
from subspace.evaluation.evaluator import Evaluator


@dataclass
class AbliterixSettings:
    python: str | None = None      # None: the driver's lookup ($SUBSPACE_ABLITERIX_PYTHON, else .venv-abliterix)
    trials: int | None = None      # None: abliterix's default (200)
    timeout_s: float = 3600.0


def unsupported(organism: str, family_name: str) -> Row | None:
    """The abliterix row for a model abliterix cannot load (it reads causal LMs only), saying why; None if it can."""
    return causal_only(organism, family_name, "abliterix")


def _abliterix_numbers(score: dict[str, float]) -> str:
    return (f"abliterix exported trial {score['trial']:.0f}: {score['refusals']:.0f}/{score['prompts']:.0f} "
            f"select refusals by its markers, KL {score['kl_divergence']:.3f} by its own measure")


def abliterix_row(organism: str, evaluator: Evaluator, data, work_dir: Path, settings: AbliterixSettings,
                  before: dict[str, float]) -> Row:
    """`before` holds the organism's eval-split refusal rates (shared with the other rows' runs)."""
    trials = settings.trials if settings.trials is not None else DEFAULT_TRIALS
    command = f"abliterix {ABLITERIX_VERSION} via subspace.baselines.abliterix, {trials} trials"
    python = Path(settings.python) if settings.python else default_python()
    start = time.time()
    model_dir = save_organism(evaluator, work_dir)
    result = run_abliterix(model_dir, Path(work_dir) / "abliterix", harmful_train=data["train_harmful"],
                           harmless_train=data["train_harmless"], harmful_eval=data["select_harmful"],
                           harmless_eval=data["select_harmless"], trials=settings.trials,
                           system_prompt=evaluator.system_prompt, python=python, timeout_s=settings.timeout_s,
                           extra_config={"inference": {"max_gen_tokens": evaluator.max_new_tokens}})
    if result.error or not result.models:
        return Row(organism, "abliterix", command, before["refusal_rate"], wall_s=time.time() - start,
                   note=result.error or "abliterix exported no model")
    edited = evaluator_for(result.models[0], evaluator, "abliterix")
    numbers = eval_split_numbers(edited, evaluator, data, "abliterix")
    return Row(organism, "abliterix", command, before["refusal_rate"], wall_s=time.time() - start,
               trials_or_steps=f"{result.trials} trials completed",
               note=_abliterix_numbers(result.scores[0]) if result.scores else None, **numbers)
