"""The public prompt splits stay in ../shared/data: results/ stores prompt references, never their text.

`scripts/strip_prompts.py --check results/` must find no `"prompt"` text field; the strip and `read_samples` round trip
is checked on a tiny file of the project's own (builtin) prompts. Every subprocess and index here points
$SUBSPACE_SHARED_DATA at an empty folder, so no test reads the public splits (and never holdout/).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from subspace.evaluation.labelled import PromptIndex, PromptReferenceError, read_samples

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "strip_prompts.py"


@pytest.fixture
def no_shared(tmp_path, monkeypatch) -> Path:
    empty = tmp_path / "no_shared_data"
    empty.mkdir()
    monkeypatch.setenv("SUBSPACE_SHARED_DATA", str(empty))
    return empty


def strip(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=120)


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def test_results_hold_no_prompt_text(no_shared):
    done = strip("--check", ROOT / "results")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "none holds prompt text" in done.stdout


def test_strip_then_read_gives_back_every_row(no_shared, tmp_path):
    index = PromptIndex(shared=no_shared)
    harmful, harmless = index.sets["builtin:harmful_heldout"], index.sets["builtin:harmless_heldout"]
    rows = [{"split": "harmful", "prompt": harmful[3], "before": "No.", "after": "Sure: ...", "refused_before": True},
            {"set": "harmless_heldout", "prompt": harmless[0], "response": "Here ü \"quoted\"\n", "refused": False},
            {"split": "harmless", "prompt_set": "builtin:harmless_heldout", "prompt_index": 1, "before": "a"}]
    path = tmp_path / "run" / "samples.jsonl"
    path.parent.mkdir()
    write_rows(path, rows)

    checked = strip("--check", tmp_path / "run")
    assert checked.returncode == 1 and f"{path}: 2 rows hold prompt text" in checked.stdout
    done = strip(tmp_path / "run")
    assert done.returncode == 0, done.stderr
    assert f"{path}: 2 of 3 rows changed" in done.stdout
    stored = [json.loads(line) for line in path.read_text().splitlines()]
    assert '"prompt":' not in path.read_text() and len(stored) == 3
    assert list(stored[0]) == ["split", "prompt_set", "prompt_index", "before", "after", "refused_before"]
    assert stored[0]["prompt_set"] == "builtin:harmful_heldout" and stored[0]["prompt_index"] == 3
    assert stored[1] == {"set": "harmless_heldout", "prompt_set": "builtin:harmless_heldout", "prompt_index": 0,
                         "response": "Here ü \"quoted\"\n", "refused": False}
    assert stored[2] == rows[2]

    back = read_samples(path, index)
    assert [r["prompt"] for r in back] == [harmful[3], harmless[0], harmless[1]]
    assert [{k: v for k, v in r.items() if k not in ("prompt_set", "prompt_index")} for r in back[:2]] == rows[:2]
    assert read_samples(path) == back  # builds its own index, from the builtin sets only here

    before = path.read_bytes()
    again = strip(path)
    assert again.returncode == 0 and f"{path}: 0 of 3 rows changed" in again.stdout
    assert path.read_bytes() == before
    assert strip("--check", path).returncode == 0


def test_a_prompt_in_no_set_is_an_error_and_nothing_is_written(no_shared, tmp_path):
    harmful = PromptIndex(shared=no_shared).sets["builtin:harmful_heldout"][0]
    unknown = "A prompt that no set holds, " + "x" * 100
    path = tmp_path / "samples.jsonl"
    write_rows(path, [{"split": "harmful", "prompt": harmful, "before": "b"},
                      {"split": "harmful", "prompt": unknown, "before": "b"}])
    before = path.read_bytes()
    done = strip(path)
    assert done.returncode == 1 and "NOT written" in done.stdout
    assert f"{path}:2:" in done.stderr and repr(unknown[:80]) in done.stderr and unknown[:81] not in done.stderr
    assert path.read_bytes() == before

    # a near-duplicate (only case and punctuation differ) is stored with --near, and read back exactly
    near = harmful[0].swapcase() + harmful[1:] + "!!"
    write_rows(path, [{"split": "harmful", "prompt": near, "before": "b"}])
    assert strip(path).returncode == 1
    assert strip("--near", path).returncode == 0
    assert '"prompt":' not in path.read_text() and "prompt_edits" in path.read_text()
    assert read_samples(path, PromptIndex(shared=no_shared))[0]["prompt"] == near


def test_reading_a_shared_reference_without_the_public_splits_says_where_they_go(no_shared, tmp_path):
    path = tmp_path / "samples.jsonl"
    write_rows(path, [{"split": "harmful", "prompt_set": "shared:prompts/harmful_val", "prompt_index": 0}])
    with pytest.raises(PromptReferenceError, match=r"samples\.jsonl:1: .*SUBSPACE_SHARED_DATA"):
        read_samples(path)
    text_rows = [{"split": "harmful", "prompt": "text kept as it is", "before": "b"}]
    write_rows(path, text_rows)  # a run directory's samples (outputs/) still hold text: read as they are
    assert read_samples(path) == text_rows
