"""Capability benchmarks (lm-evaluation-harness) before and after an edit, offline: a tiny random Llama saved as a
local model, a train.py-shaped run directory holding a random edit, and a multiple-choice task written here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from subspace.config import register_resolvers
from subspace.evaluation import capabilities as cap
from subspace.families import CausalFamily
from subspace.interventions.edit import ProjectionEdit
from subspace.models.tiny import tiny_random_causal
from tests.conftest import ROOT, random_edit

pytest.importorskip("lm_eval", reason='pip install -e ".[capabilities]"')

TASK = "subspace_tiny_choice"
N_DOCS = 8
COLOURS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """What train.py leaves behind, as far as this script reads it: edit.safetensors and .hydra/config.yaml (the
    real configuration composed with model=pretrained on a local tiny model, interpolations unresolved)."""
    root = tmp_path_factory.mktemp("capabilities")
    bundle = tiny_random_causal(hidden_size=32, num_layers=3, seed=0)
    model_dir = root / "tiny-llama"
    bundle.model.save_pretrained(model_dir)
    bundle.tokenizer.save_pretrained(model_dir)
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=pretrained", f"model.pretrained={model_dir}",
                                           f"paths.cache_dir={root / 'cache'}"])
    run = root / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    edit = random_edit(CausalFamily(bundle.model), rank=2, seed=1, strength=1.0)
    edit.meta = {"method": "random", "model": model_dir.name}
    edit.save(run / "edit.safetensors")
    return run


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A local lm-eval multiple-choice task: a JSONL the test writes, read by the `json` dataset builder."""
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "colours.jsonl"
    data.write_text("".join(json.dumps({"question": f"Which colour is number {i}?", "choices": COLOURS,
                                        "answer": i % len(COLOURS)}) + "\n" for i in range(N_DOCS)))
    (folder / f"{TASK}.yaml").write_text(f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return folder


def test_base_and_edited_scores_side_by_side_weights_restored_bit_exactly(run_dir, task_dir):
    run = cap.locate_run(run_dir)
    bundle = cap.load_model(cap.run_model_config(run), device="cpu")
    before = {name: t.clone() for name, t in bundle.model.state_dict().items()}
    edit = ProjectionEdit.load(run.edit)
    manager = cap.task_manager(str(task_dir), include_defaults=False)
    settings = cap.Settings(limit=6, batch_size=4, bootstrap_iters=0)
    report = cap.compare_capabilities(bundle, edit, [TASK], settings, manager)

    after = bundle.model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), f"{name} changed"

    rows = {row.metric: row for row in report.rows if row.task == TASK}
    assert rows.keys() == {"acc", "acc_norm"}
    for row in rows.values():
        assert isinstance(row.base, float) and isinstance(row.edited, float)
        assert 0.0 <= row.base <= 1.0 and 0.0 <= row.edited <= 1.0
        assert row.difference == pytest.approx(row.edited - row.base) and row.n == 6 and row.higher_is_better
        assert row.base * 6 == pytest.approx(round(row.base * 6))  # a share of the 6 documents
    # the edit reached the model in the second run: its log-likelihoods moved on the documents
    changed = report.changed[TASK]
    assert changed["compared"] == 6 and changed["changed"] >= 1 and changed["max_abs_loglikelihood_change"] > 0
    assert report.raw["base"]["n-samples"][TASK]["effective"] == 6

    # apply=hooks (the activation form) is the same edit on this pre-norm model: the same scores
    hooked = cap.compare_capabilities(bundle, edit, [TASK], cap.Settings(limit=6, batch_size=4, bootstrap_iters=0,
                                                                         apply="hooks"), manager)
    assert [(r.metric, r.base, r.edited) for r in hooked.rows] == [(r.metric, r.base, r.edited) for r in report.rows]
    assert hooked.changed[TASK]["max_abs_loglikelihood_change"] == pytest.approx(
        changed["max_abs_loglikelihood_change"], rel=1e-3, abs=1e-4)
    assert all(torch.equal(bundle.model.state_dict()[name], tensor) for name, tensor in before.items())

    # and the same edit in weight form, straight on the logits: it changes them, and leaves nothing behind
    ids = bundle.tokenizer("Question: Which colour is number 3?\nAnswer: blue", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = bundle.model(ids).logits
        with edit.merged(bundle.model):
            merged = bundle.model(ids).logits
        again = bundle.model(ids).logits
    assert not torch.allclose(plain, merged) and torch.equal(plain, again)

    table = cap.format_table(report.rows)
    assert table.splitlines()[0] == "| task | metric | n | base | edited | difference |"
    assert f"| {TASK} | acc ↑ | 6 |" in table


def test_script_writes_both_scores_into_the_run_directory(run_dir, task_dir, tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "capabilities.py"), f"edit={run_dir}", f"tasks=[{TASK}]",
           f"include_path={task_dir}", "include_defaults=false", "limit=5", "batch_size=2", "num_fewshot=1",
           "device=cpu", "bootstrap_iters=0", f"hydra.run.dir={tmp_path / 'hydra'}"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((run_dir / cap.JSON_NAME).read_text())
    assert saved["tasks"] == [TASK] and saved["settings"]["limit"] == 5 and saved["settings"]["num_fewshot"] == 1
    assert saved["model"] == "tiny-llama" and saved["run_dir"] == str(run_dir) and saved["device"] == "cpu"
    rows = {row["metric"]: row for row in saved["rows"]}
    assert {"acc", "acc_norm"} <= rows.keys()
    for row in rows.values():
        assert 0.0 <= row["base"] <= 1.0 and 0.0 <= row["edited"] <= 1.0 and row["n"] == 5
    assert saved["changed_samples"][TASK]["changed"] >= 1
    assert saved["lm_eval"]["edited"]["n-shot"][TASK] == 1
    markdown = (run_dir / cap.MARKDOWN_NAME).read_text()
    assert "| task | metric | n | base | edited | difference |" in markdown and f"| {TASK} | acc ↑ | 5 |" in markdown
    assert f"| {TASK} | acc ↑ | 5 |" in done.stdout and str(run_dir / cap.JSON_NAME) in done.stdout


def test_bad_input_is_refused_naming_the_value(run_dir, task_dir, tmp_path, monkeypatch):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"not_a_run holds no edit\.safetensors"):
        cap.locate_run(empty)
    (tmp_path / "sweep" / "0").mkdir(parents=True)
    (tmp_path / "sweep" / "0" / "edit.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"sweep: pass one of them"):
        cap.locate_run(tmp_path / "sweep")
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist"):
        cap.locate_run(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="edit= is required"):
        cap.locate_run(None)
    assert cap.locate_run(run_dir / "edit.safetensors").run_dir == run_dir  # the edit file names its run too
    with pytest.raises(FileNotFoundError, match=r"has no \.hydra/config\.yaml.*model=NAME"):
        cap.run_model_config(cap.locate_run(tmp_path / "sweep" / "0"))

    for bad, match in [(dict(limit=0), "limit=0 must be"), (dict(limit=2.5), "limit=2.5 must be"),
                       (dict(batch_size=0), "batch_size=0 must be"), (dict(batch_size="big"), "batch_size='big'"),
                       (dict(num_fewshot=-1), "num_fewshot=-1"), (dict(apply="both"), r"apply='both' is not one of")]:
        with pytest.raises(ValueError, match=match):
            cap.Settings(**bad)
    assert cap.Settings(limit=10.0, batch_size="4").limit == 10 and cap.Settings(batch_size="auto:2").batch_size

    with pytest.raises(ValueError, match=r"tasks=\[\] must name lm-eval tasks"):
        cap.task_list([])
    manager = cap.task_manager(str(task_dir), include_defaults=False)
    with pytest.raises(ValueError, match=rf"'subspace_tiny_choise' is not an lm-eval task.*Did you mean {TASK}"):
        cap.check_tasks(manager, ["subspace_tiny_choise"])
    with pytest.raises(FileNotFoundError, match=r"include_path=.*missing does not exist"):
        cap.task_manager(str(tmp_path / "missing"))

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    with pytest.raises(ImportError, match=r'pip install "subspace\[capabilities\]"'):
        cap.require_lm_eval()


def test_script_fails_fast_on_a_run_without_an_edit(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "capabilities.py"), f"edit={tmp_path}",
                           "tasks=[arc_easy]", f"hydra.run.dir={tmp_path / 'hydra'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and f"edit={tmp_path} holds no edit.safetensors" in done.stderr
