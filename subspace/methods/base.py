"""What every method gets from a run, and what it must return."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import lightning as L

from subspace.data.prompt_sets import PromptSets
from subspace.evaluation.evaluator import Evaluator
from subspace.families.base import Family
from subspace.interventions.edit import ProjectionEdit
from subspace.models.bundle import ModelBundle


@dataclass
class RunContext:
    bundle: ModelBundle
    family: Family
    data: PromptSets
    evaluator: Evaluator
    run_dir: Path
    make_trainer: Callable[..., L.Trainer] | None = None
    ckpt_path: str | None = None  # resume a Lightning run ("last" or a path)
    report: dict[str, Any] = field(default_factory=dict)  # extra numbers a method wants in metrics.json


class Method(Protocol):
    name: str

    def fit(self, ctx: RunContext) -> ProjectionEdit: ...

    def describe(self) -> dict[str, Any]: ...
