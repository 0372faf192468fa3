"""Responses labelled by reading, stored with prompt *references* so the public sets' text stays in `../shared/data`.

A reference is `{"prompt_set": "shared:prompts/harmful_val", "prompt_index": 12}` (a public split beside the project)
or `{"prompt_set": "builtin:harmful_heldout", "prompt_index": 3}` (the project's own sets, shipped in the package).
The samples under `results/` store the same references (`scripts/strip_prompts.py` writes them); `read_samples`
reads such a file back with the prompt text filled in.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from subspace.config import shared_data_dir
from subspace.data.loading import BUILTIN_DIR, prompt_key

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
        self._by_key: dict[str, tuple[str, int]] | None = None  # prompt_key -> (set, index), built on first use

    def has(self, prompt: str) -> bool:
        return prompt.strip() in self._where

    def reference(self, prompt: str, near: bool = False) -> dict:
        """`{"prompt_set", "prompt_index"}` of `prompt` (the first set, in `sets` order, that holds it).

        Matching ignores leading and trailing whitespace; where the set's text is not exactly `prompt`, the reference
        also carries `"prompt_edits"`, which `resolve` applies to get `prompt` back exactly. With `near`, a prompt no
        set holds is matched up to case, spacing and punctuation (`prompt_key`, as the leak checks compare) -- a prompt
        since removed from a split as a near-duplicate of another -- when at most `max(4, len // 10)` characters differ.
        """
        hit = self._where.get(prompt.strip())
        if hit is None and near:
            hit = self._near_index().get(prompt_key(prompt))
        if hit is None:
            raise KeyError(f"prompt not found in any builtin set or in {self.shared}: {prompt[:80]!r}")
        ref = {"prompt_set": hit[0], "prompt_index": hit[1]}
        if (text := self.sets[hit[0]][hit[1]]) != prompt:
            edits = _edits(text, prompt)
            if sum(len(new) for _, _, new in edits) > max(4, len(prompt) // 10):
                raise KeyError(f"prompt only nearly matches {hit[0]}[{hit[1]}] and differs in too many characters "
                               f"to store as edits: {prompt[:80]!r}")
            ref["prompt_edits"] = edits
        return ref

    def prompt(self, prompt_set: str, prompt_index: int) -> str:
        if prompt_set not in self.sets:
            where = f"{self.shared} (set $SUBSPACE_SHARED_DATA)" if prompt_set.startswith("shared:") else "the builtin sets"
            raise KeyError(f"prompt_set={prompt_set!r} is not available: not found in {where}; "
                           f"available: {sorted(self.sets)}")
        if not 0 <= prompt_index < len(self.sets[prompt_set]):
            raise KeyError(f"prompt_index={prompt_index} is out of range: {prompt_set} holds "
                           f"{len(self.sets[prompt_set])} prompts (has the split changed?)")
        return self.sets[prompt_set][prompt_index]

    def resolve(self, ref: dict) -> str:
        """The exact prompt text of a reference (a row holding `prompt_set`, `prompt_index`, maybe `prompt_edits`)."""
        text = self.prompt(ref["prompt_set"], ref["prompt_index"])
        for start, end, new in reversed(ref.get("prompt_edits", [])):
            text = text[:start] + new + text[end:]
        return text

    def _near_index(self) -> dict[str, tuple[str, int]]:
        if self._by_key is None:
            self._by_key = {}
            for name, prompts in self.sets.items():
                for i, p in enumerate(prompts):
                    self._by_key.setdefault(prompt_key(p), (name, i))
        return self._by_key


def _edits(text: str, target: str) -> list[list]:
    """`[[start, end, new], ...]` (in order, positions in `text`) that turn `text` into `target`."""
    ops = difflib.SequenceMatcher(None, text, target, autojunk=False).get_opcodes()
    return [[i1, i2, target[j1:j2]] for op, i1, i2, j1, j2 in ops if op != "equal"]


REFERENCE_KEYS = ("prompt_set", "prompt_index", "prompt_edits")


class PromptReferenceError(LookupError):
    """A results row whose prompt cannot be stored as a reference, or whose reference cannot be resolved."""


def has_prompt_text(row: dict) -> bool:
    return isinstance(row.get("prompt"), str)


def to_reference(row: dict, index: PromptIndex, near: bool = False) -> dict:
    """`row` with its `"prompt"` text replaced, in the same place, by the prompt's reference; every other key as it
    was. A row that already holds a reference, or has no prompt text, comes back unchanged (the same object)."""
    if "prompt_set" in row or not has_prompt_text(row):
        return row
    ref = index.reference(row["prompt"], near=near)
    out = {}
    for key, value in row.items():
        out.update(ref if key == "prompt" else {key: value})
    return out


def from_reference(row: dict, index: PromptIndex) -> dict:
    """`row` with `"prompt"` (the exact text) put before its reference keys, which it keeps; a row without a
    reference comes back unchanged."""
    if "prompt_set" not in row or "prompt" in row:
        return row
    out = {}
    for key, value in row.items():
        if key == "prompt_set":
            out["prompt"] = index.resolve(row)
        out[key] = value
    return out


def read_samples(path: str | Path, index: PromptIndex | None = None) -> list[dict]:
    """The rows of a JSONL results file (`samples.jsonl`, `organism_responses.jsonl`) with `"prompt"` text filled in
    from each row's reference; rows that still hold their text (run directories under outputs/) come back as they are.

    Resolving a `shared:` reference needs the public splits (`../shared/data`, or `$SUBSPACE_SHARED_DATA`); without
    them this raises `PromptReferenceError` naming the file, the line and the missing split. The index is built only
    when a row holds a reference (pass one to share it between files).
    """
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "prompt_set" in row and "prompt" not in row:
            index = index or PromptIndex()
            try:
                row = from_reference(row, index)
            except KeyError as e:
                raise PromptReferenceError(f"{path}:{n}: cannot resolve the prompt reference: {e.args[0]}") from e
        rows.append(row)
    return rows


def load_labelled(path: Path = LABELLED_SET, part: str | None = None, index: PromptIndex | None = None) -> list[dict]:
    """The labelled responses with their prompt text filled in; `part` = "fit" or "check" keeps one half."""
    index = index or PromptIndex()
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if part is None or r["part"] == part]
    return [r | {"prompt": index.resolve(r)} for r in rows]


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
