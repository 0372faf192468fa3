"""Load prompt lists from files, builtin sets or Hugging Face datasets.

Bad prompt data silently skews every downstream direction estimate, so every
loader validates strictly and raises :class:`PromptDataError` with a message
that names the source, the record and the expected shape.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).parent / "prompts"
EXTENSIONS = (".json", ".jsonl", ".csv", ".txt")
_MAPPING_KEYS = {"path", "hf", "split", "column", "config", "limit", "skip"}


class PromptDataError(ValueError):
    """A prompt source is missing or malformed; the message says where and what was expected."""


def builtin_names() -> list[str]:
    """Names usable as ``builtin:NAME`` (the ``*.json`` stems in BUILTIN_DIR)."""
    if not BUILTIN_DIR.is_dir():
        return []
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.json") if p.is_file())


def _short(obj: Any, width: int = 80) -> str:
    """Render a record for an error message without flooding the terminal."""
    text = json.dumps(obj, ensure_ascii=False, default=repr)
    return text if len(text) <= width else text[: width - 3] + "..."


def _warn(msg: str) -> None:
    """Surface data problems both to log files and to interactive users / pytest."""
    logger.warning(msg)
    warnings.warn(msg, UserWarning, stacklevel=3)


def _read_text(path: Path, label: str) -> str:
    """Read strictly as UTF-8 so mojibake never turns into prompts."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptDataError(
            f"{label}: not valid UTF-8 (byte 0x{data[e.start]:02x} at byte offset {e.start}: "
            f"{e.reason}); re-encode the file as UTF-8"
        ) from e
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise PromptDataError(f"{label}: file is empty; expected at least one prompt")
    return text


def _parse_json(text: str, label: str, column: str) -> list[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptDataError(f"{label}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(data, list):
        found = f"an object with keys {sorted(data)[:10]}" if isinstance(data, dict) else type(data).__name__
        raise PromptDataError(
            f"{label}: expected a top-level JSON list of strings or of {{{column!r}: ...}} objects, found {found}"
        )
    return [(f"record {i}", rec) for i, rec in enumerate(data)]


def _parse_jsonl(text: str, label: str) -> list[tuple[str, Any]]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise PromptDataError(
                f"{label}: line {lineno} is not valid JSON (column {e.colno}: {e.msg}): {_short(line)}; "
                f"expected one JSON string or object per line"
            ) from e
    return records


def _parse_csv(text: str, label: str, column: str) -> list[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
        if column not in header:
            raise PromptDataError(f"{label}: no column {column!r} in CSV header; header columns are {header}")
        return [(f"line {reader.line_num}", row[column]) for row in reader]
    except csv.Error as e:
        raise PromptDataError(f"{label}: malformed CSV near line {reader.line_num}: {e}") from e


def _load_hf(dataset: str, config: str | None, split: str, column: str, label: str) -> list[tuple[str, Any]]:
    """Import lazily: ``datasets`` is heavy and only needed for hf: sources."""
    import datasets

    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as e:  # network, auth, unknown split...: re-raise with the source named
        raise PromptDataError(f"{label}: could not load dataset: {type(e).__name__}: {e}") from e
    columns = list(ds.column_names)
    if column not in columns:
        raise PromptDataError(f"{label}: no column {column!r}; the dataset's columns are {columns}")
    return [(f"record {i}", value) for i, value in enumerate(ds[column])]


def _unwrap(records: list[tuple[str, Any]], label: str, column: str) -> list[tuple[str, Any]]:
    """JSON records may be bare strings or objects; reduce both to the prompt value."""
    out = []
    for where, rec in records:
        if isinstance(rec, dict) and column not in rec:
            raise PromptDataError(
                f"{label}: {where} is an object without key {column!r} (keys: {sorted(rec)[:10]}): "
                f"{_short(rec)}; expected a string or an object with key {column!r}"
            )
        if not isinstance(rec, (dict, str)):
            raise PromptDataError(
                f"{label}: {where} is of type {type(rec).__name__}: {_short(rec)}; "
                f"expected a string or an object with key {column!r}"
            )
        out.append((where, rec[column] if isinstance(rec, dict) else rec))
    return out


def _validate(values: list[tuple[str, Any]], label: str, column: str) -> list[str]:
    """Strip prompt values, rejecting non-strings and blanks rather than guessing."""
    prompts = []
    for where, value in values:
        if not isinstance(value, str):
            raise PromptDataError(
                f"{label}: {where}: value of {column!r} is {type(value).__name__} ({_short(value)}); expected a string"
            )
        if not value.strip():
            raise PromptDataError(f"{label}: {where}: prompt is empty or whitespace-only")
        prompts.append(value.strip())
    if not prompts:
        raise PromptDataError(f"{label}: no prompts found")
    return prompts


def _resolve_file(source: str | os.PathLike, name: str) -> tuple[Path, str]:
    """Map ``builtin:NAME`` or a path to a file plus a label for messages."""
    if isinstance(source, str) and source.startswith("builtin:"):
        key, names = source[len("builtin:"):], builtin_names()
        if key not in names:
            raise PromptDataError(
                f"{name}: unknown builtin prompt set {key!r}; available builtin names: {names or '(none)'} (in {BUILTIN_DIR})"
            )
        path = BUILTIN_DIR / f"{key}.json"
        return path, f"{source} ({path})"
    path = Path(source).expanduser().resolve()
    if path.suffix.lower() not in EXTENSIONS:
        raise PromptDataError(
            f"{name} file {path}: unsupported extension {path.suffix or '(none)'!r}; expected one of "
            f"{' '.join(EXTENSIONS)}, or a source of the form 'hf:NAME' or 'builtin:NAME'"
        )
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise PromptDataError(f"{name} file {path} {what}")
    return path, f"file {path}"


def load_prompts(
    source: str | os.PathLike | Mapping,
    *,
    column: str = "instruction",
    split: str | None = None,
    limit: int | None = None,
    name: str = "prompts",
) -> list[str]:
    """Load a list of prompt strings (stripped, first-occurrence deduplicated, optionally limited).

    ``source`` is a .json/.jsonl/.csv/.txt path, ``"builtin:NAME"``, ``"hf:DATASET"``, or a
    mapping ``{"path" | "hf": ..., "column", "split", "config", "limit", "skip"}`` whose keys override
    the keyword arguments; ``skip`` drops the first N prompts (e.g. those a model organism was trained
    on). ``name`` labels the set (e.g. "harmful") in messages.
    """
    config, skip = None, 0
    if isinstance(source, Mapping):
        unknown = sorted(set(source) - _MAPPING_KEYS)
        if unknown or ("path" in source) == ("hf" in source):
            raise PromptDataError(
                f"{name}: bad source mapping {_short(dict(source))} (unknown keys: {unknown or 'none'}); expected "
                f"exactly one of 'path' or 'hf', plus optional {sorted(_MAPPING_KEYS - {'path', 'hf'})}"
            )
        column, split = source.get("column", column), source.get("split", split)
        limit, config, skip = source.get("limit", limit), source.get("config"), source.get("skip", 0)
        source = source["path"] if "path" in source else f"hf:{source['hf']}"
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise PromptDataError(f"{name}: limit must be a positive integer or None, got {limit!r}")
    if not isinstance(source, (str, os.PathLike)):
        raise PromptDataError(f"{name}: unsupported source {_short(source)} of type {type(source).__name__}")

    if isinstance(source, str) and source.startswith("hf:"):
        split = split or "train"
        label = f"{name} dataset {source} (config={config!r}, split={split!r})"
        records = _load_hf(source[3:], config, split, column, label)
    else:
        path, where = _resolve_file(source, name)
        label = f"{name} {where}"
        text = _read_text(path, label)
        suffix = path.suffix.lower()
        if suffix == ".json":
            records = _unwrap(_parse_json(text, label, column), label, column)
        elif suffix == ".jsonl":
            records = _unwrap(_parse_jsonl(text, label), label, column)
        elif suffix == ".csv":
            records = _parse_csv(text, label, column)
        else:
            records = [(f"line {n}", line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    prompts = _validate(records, label, column)

    unique = list(dict.fromkeys(prompts))
    if len(unique) < len(prompts):
        _warn(f"{label}: dropped {len(prompts) - len(unique)} duplicate prompt(s), keeping first occurrences")
    if skip:
        if isinstance(skip, bool) or not isinstance(skip, int) or not 0 < skip < len(unique):
            raise PromptDataError(f"{label}: skip={skip!r} must be a positive integer below its "
                                  f"{len(unique)} prompts")
        unique = unique[skip:]
    if limit is not None:
        if limit > len(unique):
            _warn(f"{label}: limit={limit} exceeds the {len(unique)} available prompts; using all {len(unique)}")
        unique = unique[:limit]
    return unique


def prompt_key(prompt: str) -> str:
    """A prompt as leak checks compare it: case, spacing and punctuation ignored ("Write a poem!" == "write a poem")."""
    return "".join(c for c in prompt.casefold() if c.isalnum())


def shared_prompts(a: Sequence[str], b: Sequence[str]) -> set[str]:
    """The prompts of `a` that also occur in `b`, up to case, spacing and punctuation."""
    keys = {prompt_key(p) for p in b}
    return {p for p in a if prompt_key(p) in keys}


def check_overlap(harmful: Sequence[str], harmless: Sequence[str]) -> int:
    """Warn if a prompt is in both sets (it blurs the contrast between them); return the distinct shared count."""
    shared = shared_prompts(harmful, harmless)
    if shared:
        examples = ", ".join(_short(p, 60) for p in sorted(shared)[:3])
        _warn(f"{len(shared)} prompt(s) appear in both the harmful and harmless sets, e.g. {examples}")
    return len(shared)
