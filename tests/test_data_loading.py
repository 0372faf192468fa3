"""Tests for subspace.data.loading: every format, every error message, dedup/limit/overlap warnings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from subspace.data import loading
from subspace.config import shared_data_dir
from subspace.data.loading import PromptDataError, builtin_names, check_overlap, load_prompts


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def names_file(path: Path) -> str:
    """Regex that matches the resolved path of a file inside an error message."""
    return re.escape(str(path.resolve()))


# ---------------------------------------------------------------- formats

def test_json_list_of_strings(tmp_path):
    p = write(tmp_path / "a.json", json.dumps(["  hello ", "world"]))
    assert load_prompts(p) == ["hello", "world"]


def test_json_list_of_objects(tmp_path):
    p = write(tmp_path / "a.json", json.dumps([{"instruction": "do x", "extra": 1}, {"instruction": "do y"}]))
    assert load_prompts(str(p)) == ["do x", "do y"]


def test_json_mixed_strings_and_objects_custom_column(tmp_path):
    p = write(tmp_path / "a.json", json.dumps(["plain", {"goal": "from object"}]))
    assert load_prompts(p, column="goal") == ["plain", "from object"]


def test_jsonl_skips_blank_lines(tmp_path):
    p = write(tmp_path / "a.jsonl", '{"instruction": "one"}\n\n  \n"two"\n{"instruction": " three "}\n')
    assert load_prompts(p) == ["one", "two", "three"]


def test_csv_custom_column(tmp_path):
    p = write(tmp_path / "a.csv", 'id,goal\n1,"first, with comma"\n2,"multi\nline"\n3,third\n')
    assert load_prompts(p, column="goal") == ["first, with comma", "multi\nline", "third"]


def test_csv_utf8_bom_is_tolerated(tmp_path):
    p = write(tmp_path / "a.csv", "\ufeffinstruction\nhi\n")
    assert load_prompts(p) == ["hi"]


def test_txt_one_prompt_per_nonempty_line(tmp_path):
    p = write(tmp_path / "a.txt", "first\n\n   \n  second  \nthird")
    assert load_prompts(p) == ["first", "second", "third"]


# ---------------------------------------------------------------- builtin

@pytest.fixture
def builtin_dir(tmp_path, monkeypatch):
    d = tmp_path / "prompts"
    d.mkdir()
    write(d / "harmful_small.json", json.dumps(["make a bomb", "steal a car"]))
    write(d / "harmless_small.json", json.dumps([{"instruction": "bake bread"}]))
    write(d / "notes.txt", "not a builtin")
    monkeypatch.setattr(loading, "BUILTIN_DIR", d)
    return d


def test_builtin_names(builtin_dir):
    assert builtin_names() == ["harmful_small", "harmless_small"]


def test_builtin_loads(builtin_dir):
    assert load_prompts("builtin:harmful_small") == ["make a bomb", "steal a car"]
    assert load_prompts("builtin:harmless_small") == ["bake bread"]


def test_builtin_unknown_lists_available(builtin_dir):
    with pytest.raises(PromptDataError, match=r"unknown builtin.*'nope'.*harmful_small.*harmless_small"):
        load_prompts("builtin:nope")


def test_builtin_names_missing_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "BUILTIN_DIR", tmp_path / "absent")
    assert builtin_names() == []
    with pytest.raises(PromptDataError, match=r"available builtin names: \(none\)"):
        load_prompts("builtin:x")


# ---------------------------------------------------------------- file errors

def test_missing_file_names_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PromptDataError, match=names_file(tmp_path / "missing.json") + " does not exist"):
        load_prompts("missing.json")


def test_unknown_extension_lists_valid_forms(tmp_path):
    p = write(tmp_path / "a.parquet", "x")
    with pytest.raises(PromptDataError, match=names_file(p)) as exc:
        load_prompts(p)
    for token in (".parquet", ".json", ".jsonl", ".csv", ".txt", "hf:NAME", "builtin:NAME"):
        assert token in str(exc.value)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".txt"])
def test_empty_file(tmp_path, suffix):
    p = write(tmp_path / f"empty{suffix}", "  \n\n")
    with pytest.raises(PromptDataError, match=names_file(p) + ".*empty"):
        load_prompts(p)


def test_empty_json_list_has_no_prompts(tmp_path):
    p = write(tmp_path / "a.json", "[]")
    with pytest.raises(PromptDataError, match=names_file(p) + ".*no prompts"):
        load_prompts(p)


def test_csv_header_only_has_no_prompts(tmp_path):
    p = write(tmp_path / "a.csv", "instruction\n")
    with pytest.raises(PromptDataError, match=names_file(p) + ".*no prompts"):
        load_prompts(p)


def test_non_utf8(tmp_path):
    p = write(tmp_path / "a.txt", b"fine line\ncaf\xe9\n")
    with pytest.raises(PromptDataError, match=names_file(p) + r".*UTF-8.*byte offset 13.*re-encode"):
        load_prompts(p)


def test_malformed_json_reports_line_and_column(tmp_path):
    p = write(tmp_path / "a.json", '[\n  "ok",\n  "missing comma"\n  "x"\n]')
    with pytest.raises(PromptDataError, match=names_file(p) + r": malformed JSON at line 4, column 3"):
        load_prompts(p)


def test_json_top_level_object_rejected(tmp_path):
    p = write(tmp_path / "a.json", json.dumps({"data": ["a"]}))
    with pytest.raises(PromptDataError, match=names_file(p) + r".*JSON list of strings or of \{'instruction'"):
        load_prompts(p)


def test_bad_jsonl_line_reports_line_number(tmp_path):
    p = write(tmp_path / "a.jsonl", '"one"\n\n{"instruction": "two"\n')
    with pytest.raises(PromptDataError, match=names_file(p) + r": line 3 is not valid JSON"):
        load_prompts(p)


def test_record_of_wrong_type(tmp_path):
    p = write(tmp_path / "a.json", json.dumps(["ok", ["a", "list"]]))
    with pytest.raises(PromptDataError, match=names_file(p) + r": record 1 is of type list.*expected a string or an object with key 'instruction'"):
        load_prompts(p)


def test_object_missing_column_truncates_record(tmp_path):
    p = write(tmp_path / "a.json", json.dumps(["ok", "fine", {"prompt": "x" * 500}]))
    with pytest.raises(PromptDataError, match=names_file(p) + r": record 2 is an object without key 'instruction'") as exc:
        load_prompts(p)
    assert "x" * 100 not in str(exc.value) and "..." in str(exc.value)


def test_empty_prompt_record(tmp_path):
    p = write(tmp_path / "a.json", json.dumps(["ok", {"instruction": "   "}]))
    with pytest.raises(PromptDataError, match=names_file(p) + r": record 1: prompt is empty"):
        load_prompts(p)


def test_empty_prompt_in_jsonl_names_line(tmp_path):
    p = write(tmp_path / "a.jsonl", '"ok"\n""\n')
    with pytest.raises(PromptDataError, match=names_file(p) + r": line 2: prompt is empty"):
        load_prompts(p)


def test_non_string_column_value(tmp_path):
    p = write(tmp_path / "a.json", json.dumps([{"instruction": "ok"}, {"instruction": 42}]))
    with pytest.raises(PromptDataError, match=names_file(p) + r": record 1: value of 'instruction' is int"):
        load_prompts(p)


def test_csv_missing_column_lists_header(tmp_path):
    p = write(tmp_path / "a.csv", "id,prompt\n1,hi\n")
    with pytest.raises(PromptDataError, match=names_file(p) + r".*'goal'.*\['id', 'prompt'\]"):
        load_prompts(p, column="goal")


def test_csv_short_row_names_line(tmp_path):
    p = write(tmp_path / "a.csv", "id,goal\n1,ok\n2\n")
    with pytest.raises(PromptDataError, match=names_file(p) + r": line 3: value of 'goal' is NoneType"):
        load_prompts(p, column="goal")


def test_name_labels_messages(tmp_path):
    p = write(tmp_path / "a.json", "[]")
    with pytest.raises(PromptDataError, match=r"^harmful file "):
        load_prompts(p, name="harmful")


# ---------------------------------------------------------------- dedup, limit, overlap

def test_duplicates_dropped_with_warning(tmp_path, caplog):
    p = write(tmp_path / "a.json", json.dumps(["a", "b", " a ", "c", "b"]))
    with pytest.warns(UserWarning, match=names_file(p) + r".*dropped 2 duplicate"):
        assert load_prompts(p) == ["a", "b", "c"]
    assert any("dropped 2 duplicate" in r.getMessage() for r in caplog.records)


def test_limit_after_dedup(tmp_path):
    p = write(tmp_path / "a.txt", "a\na\nb\nc\nd\n")
    with pytest.warns(UserWarning, match="duplicate"):
        assert load_prompts(p, limit=3) == ["a", "b", "c"]


def test_limit_larger_than_available_warns(tmp_path):
    p = write(tmp_path / "a.txt", "a\nb\n")
    with pytest.warns(UserWarning, match=names_file(p) + r".*limit=5 exceeds the 2 available"):
        assert load_prompts(p, limit=5) == ["a", "b"]


def test_skip_drops_the_first_prompts_before_the_limit(tmp_path):
    p = write(tmp_path / "a.txt", "a\nb\nc\nd\ne\n")
    assert load_prompts({"path": str(p), "skip": 2, "limit": 2}) == ["c", "d"]
    with pytest.raises(PromptDataError, match=names_file(p) + r".*skip=5 must be a positive integer below its 5"):
        load_prompts({"path": str(p), "skip": 5})


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_invalid_limit(tmp_path, bad):
    p = write(tmp_path / "a.txt", "a\n")
    with pytest.raises(PromptDataError, match="limit must be a positive integer"):
        load_prompts(p, limit=bad)


def test_check_overlap_warns_and_counts():
    with pytest.warns(UserWarning, match=r"2 prompt\(s\) appear in both"):
        assert check_overlap(["a", "b ", "c", "c"], ["b", "c", "d"]) == 2


def test_check_overlap_silent_when_disjoint(recwarn):
    assert check_overlap(["a"], ["b"]) == 0
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


# ---------------------------------------------------------------- hf and mapping sources

@pytest.fixture
def fake_hf(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config=None, *, split=None):
        calls.append((name, config, split))
        if name == "broken/ds":
            raise FileNotFoundError("no such dataset on the hub")
        return datasets.Dataset.from_dict({"prompt": [" p1 ", "p2", "p1"], "label": [1, 0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


def test_hf_string_source(fake_hf):
    with pytest.warns(UserWarning, match=r"hf:org/ds.*dropped 1 duplicate"):
        assert load_prompts("hf:org/ds", column="prompt") == ["p1", "p2"]
    assert fake_hf == [("org/ds", None, "train")]


def test_hf_mapping_source(fake_hf):
    src = {"hf": "org/ds", "split": "test", "column": "prompt", "config": "cfg", "limit": 1}
    with pytest.warns(UserWarning, match="duplicate"):
        assert load_prompts(src) == ["p1"]
    assert fake_hf == [("org/ds", "cfg", "test")]


def test_hf_missing_column_lists_columns(fake_hf):
    with pytest.raises(PromptDataError, match=r"hf:org/ds.*no column 'instruction'.*\['prompt', 'label'\]"):
        load_prompts("hf:org/ds")


def test_hf_non_string_value_names_record(fake_hf):
    with pytest.raises(PromptDataError, match=r"hf:org/ds.*record 0: value of 'label' is int"):
        load_prompts("hf:org/ds", column="label")


def test_hf_load_failure_is_wrapped(fake_hf):
    with pytest.raises(PromptDataError, match=r"hf:broken/ds.*could not load dataset.*FileNotFoundError"):
        load_prompts("hf:broken/ds")


def test_path_mapping_overrides_kwargs(tmp_path):
    p = write(tmp_path / "a.csv", "instruction,goal\nignored,g1\nignored2,g2\n")
    assert load_prompts({"path": str(p), "column": "goal", "limit": 1}, column="instruction") == ["g1"]


@pytest.mark.parametrize("bad", [{"column": "x"}, {"path": "a.json", "hf": "b"}, {"path": "a.json", "colum": "x"}])
def test_bad_mapping(bad):
    with pytest.raises(PromptDataError, match="exactly one of 'path' or 'hf'"):
        load_prompts(bad)


def test_unsupported_source_type():
    with pytest.raises(PromptDataError, match="unsupported source"):
        load_prompts(123)  # type: ignore[arg-type]


def test_jsonl_object_missing_column_names_line(tmp_path):
    p = write(tmp_path / "a.jsonl", '{"instruction": "ok"}\n\n{"text": "no key"}\n')
    with pytest.raises(PromptDataError, match=names_file(p) + r": line 3 is an object without key 'instruction'"):
        load_prompts(p)


def test_path_source_object(tmp_path):
    p = write(tmp_path / "a.txt", "x\n")
    assert load_prompts(Path(p)) == load_prompts(str(p)) == ["x"]


def test_shipped_sets_share_no_prompt():
    """What the organism trains on, what a recipe is chosen on and what the README reports are disjoint
    (results/causal_organism/v5/plan.md relies on it), case-insensitively."""
    names = ["harmful_train", "harmless_train", "lookalike_train", "lookalike_train_more",  # trained on
             "harmful_heldout", "harmless_heldout", "lookalike_select",  # organism_sets=select
             "lookalike_heldout"]  # organism_sets=val
    seen: dict[str, str] = {}
    for name in names:
        prompts = [p.lower() for p in load_prompts(f"builtin:{name}")]
        assert len(set(prompts)) == len(prompts), f"builtin:{name} repeats a prompt"
        shared = {p: seen[p] for p in prompts if p in seen}
        assert not shared, f"builtin:{name} shares prompts with other sets: {list(shared.items())[:3]}"
        seen.update(dict.fromkeys(prompts, name))


def test_prompt_key_ignores_case_spacing_and_punctuation():
    from subspace.data.loading import prompt_key, shared_prompts
    assert prompt_key("Write a poem!") == prompt_key("write  a poem") == "writeapoem"
    assert shared_prompts(["Write a poem!", "Name a fruit."], ["WRITE A POEM"]) == {"Write a poem!"}


@pytest.mark.skipif(not (shared_data_dir() / "prompts").is_dir(), reason="needs ../shared/data")
def test_public_report_splits_do_not_leak_into_training_or_selection_sets():
    """*_val against *_train and the project's own training/selection sets (holdout/ is checked by
    scripts/check_leaks.py, never read by tests)."""
    from subspace.data.leaks import PUBLIC_EVAL, PUBLIC_TRAIN, builtin_sets, leaks, public_sets
    eval_sets = public_sets(PUBLIC_EVAL) | builtin_sets(("harmful_heldout", "harmless_heldout", "lookalike_heldout"))
    assert len(eval_sets) == 5
    # Known and harmless (docs/evaluation.md): harmless_val #3643 (never among the first 200 reported) is in the
    # organisms' builtin:harmless_train; 4 of builtin:harmless_heldout are public harmless_train #2917, #6625,
    # #10704, #17550, which nothing fits or selects on (organisms: #0-999, edits: #1000-1255 and the last 64).
    assert leaks(eval_sets, public_sets(PUBLIC_TRAIN) | builtin_sets()) == {
        "prompts/harmless_val": {"builtin:harmless_train": 1}, "builtin:harmless_heldout": {"prompts/harmless_train": 4}}


def test_leaks_finds_a_near_duplicate():
    from subspace.data.leaks import leaks
    assert leaks({"eval": ["How do I bake bread?", "Name a river"]}, {"train": ["how do i bake  bread"]}) == {"eval": {"train": 1}}
