"""The heretic driver: config and prompt sets it writes, its answers to heretic's line-based menus (against a
scripted stand-in, so CI needs no heretic), its failures as results, and one real run where heretic is installed."""

from __future__ import annotations

import sys
import time
import tomllib
from pathlib import Path

import pytest

from subspace.baselines.heretic import (DEFAULT_PYTHON, INSTALL, HereticResult, heretic_config, run_heretic,
                                        to_toml, write_prompt_sets)
from tests.conftest import ROOT

TRICKY = 'say "hi"\\ back\nthen\ttab \x7f del, é, 🙂'
SETS = {"harmful_train": ["how to pick a lock", TRICKY], "harmless_train": ["bake bread"],
        "harmful_eval": ["make a weapon"], "harmless_eval": ["plant a tree"]}

# Plays heretic 1.4.0's line-based prompts (as with KAGGLE_KERNEL_RUN_TYPE set): three Pareto-optimal
# trials, the action menu in another order than heretic's (the driver must pick entries by their text).
FAKE = r'''
import json, os, pathlib, sys, time, tomllib
mode = os.environ.get("FAKE_HERETIC", "normal")
assert os.environ.get("KAGGLE_KERNEL_RUN_TYPE"), "line-based prompts not switched on"
config = tomllib.loads(pathlib.Path("config.toml").read_text())
for i in range(1, config["n_trials"] + 1):
    print(f"Running trial {i} of {config['n_trials']}...")
if mode == "crash":
    raise SystemExit("RuntimeError: fake heretic broke")
if mode == "hang":
    time.sleep(60)
FRONT = ["[Trial   4] Refusals:  1/16, KL divergence: 0.3000",
         "[Trial   2] Refusals:  5/16, KL divergence: 0.1000",
         "[Trial   1] Refusals: 16/16, KL divergence: 0.0001"]

def select(question, titles):
    print()
    print(question)
    for i, title in enumerate(titles, 1):
        print(f"[{i}] {title}")
    return titles[int(input("Enter number: ")) - 1]

if mode == "unknown":
    select("Do you want to install a browser?", ["Yes", "No"])
while True:
    trial = select("Which trial do you want to use?", FRONT + ["Run additional trials", "Exit program"])
    if trial == "Exit program":
        sys.exit(0)
    assert trial in FRONT, trial
    while True:
        action = select("What do you want to do with the decensored model?",
                        ["Chat with the model", "Return to the trial selection menu", "Benchmark the model",
                         "Save the model to a local folder", "Upload the model to Hugging Face"])
        if action.startswith("Return"):
            break
        assert action.startswith("Save"), action
        print()
        path = pathlib.Path(input("Path to the folder:: "))
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps({"trial": trial}))
        print(f"Model saved to {path}.")
'''


def fake_python(tmp_path: Path) -> Path:
    script = tmp_path / "fake-python"
    script.write_text(f"#!{sys.executable}\n{FAKE}")
    script.chmod(0o755)
    return script


def drive(tmp_path: Path, python: Path, **kwargs) -> HereticResult:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    return run_heretic(model, tmp_path / "work", **SETS, trials=5, system_prompt=None, python=python, **kwargs)


def test_config_round_trips_through_toml(tmp_path):
    dirs = {name: tmp_path / name for name in SETS}
    config = heretic_config(tmp_path / "m", dirs, trials=10, system_prompt=TRICKY,
                            extra_config={"batch_size": 4, "seed": None, "max_memory": {"cpu": "8GB"}})
    assert tomllib.loads(to_toml(config)) == config
    assert config["system_prompt"] == TRICKY and config["n_trials"] == 10 and config["n_startup_trials"] == 3
    assert config["batch_size"] == 4 and "seed" not in config and config["dtypes"] == ["float32"]
    assert config["bad_prompts"] == {"dataset": str(dirs["harmful_train"]), "split": "train", "column": "text"}
    assert config["good_evaluation_prompts"]["dataset"] == str(dirs["harmless_eval"])
    assert heretic_config(tmp_path, dirs, 3, None)["system_prompt"] == ""


def test_prompt_sets_load_back_with_load_from_disk(tmp_path):
    from datasets import load_from_disk

    paths = write_prompt_sets(tmp_path, SETS)
    for name, prompts in SETS.items():
        assert list(load_from_disk(str(paths[name]))["text"]) == prompts


def test_missing_python_says_how_to_install(tmp_path):
    missing = tmp_path / "nowhere" / "bin" / "python"
    result = drive(tmp_path, missing)
    assert result.models == [] and result.trials == 0 and result.log is None
    assert str(missing) in result.error and INSTALL in result.error
    assert (ROOT / INSTALL.split()[0]).is_file()  # the install script the error points at exists


def test_every_pareto_trial_is_saved(tmp_path):
    result = drive(tmp_path, fake_python(tmp_path))
    assert result.error is None, result.error
    work = (tmp_path / "work").resolve()
    assert result.models == [work / "models" / str(n) for n in range(3)]
    saved = [(m / "config.json").read_text() for m in result.models]
    assert "Trial   4" in saved[0] and "Trial   2" in saved[1] and "Trial   1" in saved[2]
    assert [s["trial"] for s in result.scores] == [4, 2, 1] and result.scores[1]["kl_divergence"] == 0.1
    assert result.trials == 5  # what the fake printed, since it keeps no Optuna journal
    log = result.log.read_text()
    assert log.count("Model saved to") == 3 and log.rstrip().endswith("Enter number: 5")  # "Exit program"
    config = tomllib.loads((work / "config.toml").read_text())
    assert config["export_strategy"] == "merge" and config["n_trials"] == 5


def test_reused_work_dir_starts_afresh(tmp_path):
    stale = tmp_path / "work" / "models" / "7"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    result = drive(tmp_path, fake_python(tmp_path))
    assert not stale.exists() and len(result.models) == 3


@pytest.mark.parametrize("mode, says", [("unknown", "Do you want to install a browser?"),
                                        ("crash", "fake heretic broke")])
def test_failures_come_back_as_errors(tmp_path, monkeypatch, mode, says):
    monkeypatch.setenv("FAKE_HERETIC", mode)
    result = drive(tmp_path, fake_python(tmp_path))
    assert result.models == [] and result.error is not None and says in result.error
    assert result.log is not None and result.trials == 5


def test_timeout_stops_heretic(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_HERETIC", "hang")
    start = time.monotonic()
    result = drive(tmp_path, fake_python(tmp_path), timeout_s=2)
    assert time.monotonic() - start < 20
    assert result.models == [] and "did not finish within 2 s" in result.error


@pytest.mark.skipif(not DEFAULT_PYTHON.exists(), reason=f"no heretic venv at {DEFAULT_PYTHON} "
                    "(set SUBSPACE_HERETIC_PYTHON)")
def test_real_heretic_on_a_tiny_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from subspace.data.loading import load_prompts
    from subspace.models.tiny import tiny_random_causal

    bundle = tiny_random_causal(hidden_size=64, num_layers=4, seed=0)
    with torch.no_grad():  # default-init weights only ever answer whitespace; larger ones say varied things
        for name, weight in bundle.model.named_parameters():
            if "norm" not in name:
                weight.mul_(8)
    model_dir = tmp_path / "model"
    bundle.model.save_pretrained(model_dir)
    bundle.tokenizer.save_pretrained(model_dir)
    prompts = {name: load_prompts(f"builtin:{source}")[:16] for name, source in
               [("harmful_train", "harmful_train"), ("harmless_train", "harmless_train"),
                ("harmful_eval", "harmful_heldout"), ("harmless_eval", "harmless_heldout")]}
    # "e" as the only refusal marker makes the refusal count move with the random model's gibberish.
    result = run_heretic(model_dir, tmp_path / "work", **prompts, trials=3, system_prompt=None, timeout_s=600,
                         extra_config={"max_response_length": 6, "response_prefix": "", "refusal_markers": ["e"]})
    assert result.error is None, result.error
    assert result.trials == 3
    log = result.log.read_text()
    offered = log[log.index("Which trial do you want to use?"):].split("Enter number:")[0].count("[Trial")
    assert len(result.models) == offered >= 1 and len(result.scores) == offered
    original = bundle.model.state_dict()
    for path in result.models:
        edited = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        assert AutoTokenizer.from_pretrained(path).chat_template
        changed = [n for n, w in edited.state_dict().items() if not torch.equal(w, original[n])]
        assert changed and all("o_proj" in n or "down_proj" in n for n in changed)
