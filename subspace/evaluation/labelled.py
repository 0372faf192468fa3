"""Responses labelled by reading, stored with prompt *references* so the public sets' text stays in `../shared/data`.

A reference is `{"prompt_set": "shared:prompts/harmful_val", "prompt_index": 12}` (a public split beside the project)
or `{"prompt_set": "builtin:harmful_heldout", "prompt_index": 3}` (the project's own sets, shipped in the package).
"""

from __future__ import annotations

import json
from pathlib import Path

from subspace.config import shared_data_dir
from subspace.data.loading import BUILTIN_DIR

LABELS = ("refusal", "answer", "broken")
SHARED_SPLITS = ("prompts/harmful_train", "prompts/harmful_val", "prompts/harmless_train", "prompts/harmless_val",
                 "holdout/harmful_test", "holdout/harmless_test")
LABELLED_SET = Path(__file__).parent / "labelled" / "responses.jsonl"


def _instructions(path: Path) -> list[str]:
    return [r["instruction"] if isinstance(r, dict) else r for r in json.loads(path.read_text())]


class PromptIndex:
    """Prompt text <-> (set, index) over the project's own sets and, when present, the public splits."""

    def __init__(self, shared: Path | None = None):
        self.shared = shared_data_dir() if shared is None else Path(shared)
        self.sets: dict[str, list[str]] = {f"builtin:{p.stem}": _instructions(p) for p in sorted(BUILTIN_DIR.glob("*.json"))}
        for split in SHARED_SPLITS:
            if (path := self.shared / f"{split}.json").is_file():
                self.sets[f"shared:{split}"] = _instructions(path)
        self._where = {}
        for name, prompts in self.sets.items():
            for i, p in enumerate(prompts):
                self._where.setdefault(p.strip(), (name, i))

    def has(self, prompt: str) -> bool:
        return prompt.strip() in self._where

    def reference(self, prompt: str) -> dict:
        if (hit := self._where.get(prompt.strip())) is None:
            raise KeyError(f"prompt not found in any builtin set or in {self.shared}: {prompt[:80]!r}")
        return {"prompt_set": hit[0], "prompt_index": hit[1]}

    def prompt(self, prompt_set: str, prompt_index: int) -> str:
        if prompt_set not in self.sets:
            where = f"{self.shared} (set $SUBSPACE_SHARED_DATA)" if prompt_set.startswith("shared:") else "the builtin sets"
            raise KeyError(f"prompt_set={prompt_set!r} is not available: not found in {where}; "
                           f"available: {sorted(self.sets)}")
        return self.sets[prompt_set][prompt_index]


def load_labelled(path: Path = LABELLED_SET, part: str | None = None, index: PromptIndex | None = None) -> list[dict]:
    """The labelled responses with their prompt text filled in; `part` = "fit" or "check" keeps one half."""
    index = index or PromptIndex()
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if part is None or r["part"] == part]
    return [r | {"prompt": index.prompt(r["prompt_set"], r["prompt_index"])} for r in rows]


def agreement(labels: list[str], verdicts: list[str]) -> dict:
    """How a judge's verdicts agree with labels read by hand: the two binary agreements the docs report
    (answer vs not, refusal vs not), exact three-way agreement, and the confusion matrix {label: {verdict: n}}."""
    if len(labels) != len(verdicts) or not labels:
        raise ValueError(f"{len(labels)} labels and {len(verdicts)} verdicts: need the same number, at least one")
    n = len(labels)
    binary = lambda kind: sum((v == kind) == (t == kind) for t, v in zip(labels, verdicts)) / n  # noqa: E731
    return {"n": n, "answer_vs_not": binary("answer"), "refusal_vs_not": binary("refusal"),
            "exact": sum(v == t for t, v in zip(labels, verdicts)) / n,
            "confusion": {t: {v: sum(a == t and b == v for a, b in zip(labels, verdicts)) for v in LABELS} for t in LABELS}}


def format_agreement(stats: dict) -> str:
    lines = [f"n={stats['n']}  answer vs not {stats['answer_vs_not']:.1%}  refusal vs not {stats['refusal_vs_not']:.1%}  "
             f"exact {stats['exact']:.1%}", "label \\ verdict " + "".join(f"{v:>9}" for v in LABELS)]
    lines += [f"{t:<16}" + "".join(f"{stats['confusion'][t][v]:>9}" for v in LABELS) for t in LABELS]
    return "\n".join(lines)
