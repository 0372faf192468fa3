"""Replace the prompt text in JSONL results files by prompt references, in place:

    python scripts/strip_prompts.py results/                 # every .jsonl under results/, recursively
    python scripts/strip_prompts.py FILE.jsonl DIR ... [--near]
    python scripts/strip_prompts.py --check results/         # exit 1 listing files that still hold prompt text

Each row's `"prompt": TEXT` becomes `"prompt_set": ..., "prompt_index": ...` (`PromptIndex().reference(TEXT)` in
`subspace/evaluation/labelled.py`: a public split under ../shared/data or one of the project's own `builtin:` sets),
in the same place; every other key and value stays as it was, and rows without prompt text or already holding a
reference are left alone (running it again changes nothing). The public splits are not to be copied into the
repository (../shared/data/README.md); `read_samples` in the same module reads such a file back with the text.

A prompt found in no set is an error naming the file, the line and the prompt's first 80 characters, and nothing is
written for that file. `--near` also accepts a prompt that a set holds only up to case, spacing and punctuation (a
prompt since removed from a split as a near-duplicate of another): its reference then carries `prompt_edits`, the few
characters that turn the set's text back into the exact prompt. Files are rewritten atomically (a temporary file in the
same folder, then a rename) and only when a row changed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # this checkout's subspace package first
from subspace.evaluation.labelled import PromptIndex, has_prompt_text, to_reference  # noqa: E402
from subspace.utils.io import atomic_path  # noqa: E402


def jsonl_files(paths: list[Path]) -> list[Path]:
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*.jsonl") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise SystemExit(f"{path}: no such file or directory")
    return files


def rows_of(path: Path):
    """(line number, line, parsed row or None) for every line of `path`; None for blank lines and non-objects."""
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        row = json.loads(line) if line.strip() else None
        yield n, line, row if isinstance(row, dict) else None


def strip_file(path: Path, index: PromptIndex, near: bool = False) -> tuple[int, int, list[str]]:
    """Rewrite `path` with references; (rows changed, rows, errors). With any error nothing is written."""
    lines, changed, rows, errors = [], 0, 0, []
    for n, line, row in rows_of(path):
        if row is None:
            lines.append(line)
            continue
        rows += 1
        try:
            new = to_reference(row, index, near=near)
        except KeyError as e:
            errors.append(f"{path}:{n}: {e.args[0]}")  # names the prompt's first 80 characters
            continue
        if new is row:
            lines.append(line)
        else:
            changed += 1
            lines.append(json.dumps(new, ensure_ascii=False))
    if changed and not errors:
        mode = path.stat().st_mode & 0o7777
        with atomic_path(path) as tmp:
            tmp.write_text("\n".join(lines), encoding="utf-8")
            os.chmod(tmp, mode)
    return changed, rows, errors


def holding_text(path: Path) -> list[int]:
    """The line numbers of `path` whose row still holds a `"prompt"` text field."""
    return [n for n, _, row in rows_of(path) if row is not None and has_prompt_text(row)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help=".jsonl files, or folders searched recursively")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 listing files with prompt text")
    parser.add_argument("--near", action="store_true", help="also match up to case, spacing and punctuation")
    args = parser.parse_args(argv)
    files = jsonl_files(args.paths)
    if args.check:
        found = {path: lines for path in files if (lines := holding_text(path))}
        for path, lines in found.items():
            more = f" (+{len(lines) - 5} more)" if len(lines) > 5 else ""
            print(f"{path}: {len(lines)} rows hold prompt text, lines {', '.join(map(str, lines[:5]))}{more}")
        print(f"{len(files)} files checked, {len(found)} hold prompt text" if found else
              f"{len(files)} files checked, none holds prompt text")
        return 1 if found else 0
    index, failed = PromptIndex(), 0
    for path in files:
        changed, rows, errors = strip_file(path, index, near=args.near)
        for error in errors:
            print(error, file=sys.stderr)
        if errors:
            failed += 1
            print(f"{path}: NOT written, {len(errors)} of {rows} rows have a prompt found in no set")
        else:
            print(f"{path}: {changed} of {rows} rows changed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
