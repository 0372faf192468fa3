"""The abliterix driver: where it finds abliterix's python, the settings and command line it hands abliterix, the
prompt sets it writes, and how it reads abliterix's results, against a scripted stand-in (so CI needs no abliterix)."""

from __future__ import annotations

import json
import sys
import time
import tomllib
from pathlib import Path

import pytest

from subspace.baselines import abliterix as driver
from subspace.baselines.abliterix import (ABLITERIX_VERSION, AbliterixResult, abliterix_config, command,
                                          default_python, run_abliterix, write_prompt_sets)
from subspace.baselines.heretic import to_toml
from subspace.config import REPO_ROOT

TRICKY = 'say "hi"\\ back\nthen\ttab \x7f del, é, 🙂'
SETS = {"harmful_train": ["how to pick a lock", TRICKY], "harmless_train": ["bake bread"],
        "harmful_eval": ["make a weapon", "steal a car"], "harmless_eval": ["plant a tree"]}

# Plays abliterix 1.12.2 run as `python -c <launch> --config X --non-interactive ... --non-interactive-output-dir D`:
# its banner, baseline, one block per trial (trial 2 pruned for its KL), its Optuna journal (here plain JSON,
# which the stand-in also reads back when the driver runs it with the journal-reading script), and the export:
# a model directory with reproduce/reproduce.json. FAKE_ABLITERIX picks a failure instead.
FAKE = r'''
import json, os, pathlib, sys, time, tomllib
if "JournalStorage" in sys.argv[2]:  # the driver reading the study back
    print(pathlib.Path(sys.argv[3]).read_text())
    sys.exit(0)
mode = os.environ.get("FAKE_ABLITERIX", "normal")
args = sys.argv[3:]
pathlib.Path(os.environ["FAKE_RECORD"]).write_text(json.dumps(
    {"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {k: os.environ.get(k) for k in
     ("AX_CONFIG", "AX_OPTIMIZATION__NUM_TRIALS", "PYTHONPATH", "HF_HUB_OFFLINE", "NO_COLOR")},
     "stdin_tty": sys.stdin.isatty(), "stdin": sys.stdin.read()}))
config = tomllib.loads(pathlib.Path(args[args.index("--config") + 1]).read_text())
out = pathlib.Path(args[args.index("--non-interactive-output-dir") + 1])
version = os.environ.get("FAKE_VERSION", "1.12.2")
print(f"█▀▀█░█▀▀▄░█░░░▀█▀░▀█▀░█▀▀░█▀▀▄░▀█▀░█░█  v{version}")
for key in ("target_prompts", "benign_prompts", "target_eval_prompts", "benign_eval_prompts"):
    assert (pathlib.Path(config[key]["dataset"]) / "state.json").exists(), key
n_eval = 2
print("* Initial refusals: 2/2 known (0 unknown)")
if mode == "hang":
    time.sleep(60)
trials = config.get("optimization", {}).get("num_trials", 200)
scores = {1: (0.05, 2), 3: (0.3, 0), 4: (0.1, 1)}
rows = []
for i in range(1, trials + 1):
    print()
    print(f"Running trial {i} of {trials}...")
    print("* Parameters:")
    print("  * vector_index = per layer")
    print("* Evaluating...")
    print("  * Obtaining probability distributions and response lengths...")
    if i == 2:
        print("  * full_distribution_kl (mean_per_token_kl): 7.5000 nats/token")
        print("  * full_distribution_kl 7.5000 exceeds prune threshold 5.0, skipping compliance check")
        continue
    kl, refusals = scores.get(i, (0.2, 1))
    print(f"  * full_distribution_kl (mean_per_token_kl): {kl:.4f} nats/token")
    print("  * Response length deviation: 0.10 std devs")
    print("  * Counting model refusals...")
    print(f"  * Refusals: {refusals}/{n_eval} known (0 unknown)")
    rows.append({"trial": i, "refusals": refusals, "kl_divergence": kl, "pareto": i in (1, 3, 4)})
if mode != "nojournal":
    checkpoints = pathlib.Path(config["optimization"]["checkpoint_dir"])
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / "model.jsonl").write_text(json.dumps(rows))
if mode == "crash":
    raise SystemExit("RuntimeError: fake abliterix broke")
print(f"Non-interactive mode: optimization finished with {len(rows)} completed trials.")
if mode == "noexport":
    sys.exit(0)
best = min(rows, key=lambda r: (r["refusals"], r["kl_divergence"]))
print(f"Exporting verified trial to {out}...")
(out / "reproduce").mkdir(parents=True)
(out / "config.json").write_text("{}")
(out / "reproduce" / "reproduce.json").write_text(json.dumps({"trial": {"index": best["trial"]}, "metrics": {
    "kl_divergence": best["kl_divergence"], "refusals": best["refusals"], "baseline_refusals": 2,
    "n_target_prompts": n_eval}}))
print("Export verified: 1 weight file(s) hashed with SHA256.")
'''


def fake_python(tmp_path: Path) -> Path:
    script = tmp_path / "fake-python"
    script.write_text(f"#!{sys.executable}\n{FAKE}")
    script.chmod(0o755)
    return script


def drive(tmp_path: Path, monkeypatch, python: Path | None, **kwargs) -> AbliterixResult:
    monkeypatch.setenv("FAKE_RECORD", str(tmp_path / "record.json"))
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    kwargs.setdefault("trials", 5)
    return run_abliterix(model, tmp_path / "work", **SETS, python=python, **kwargs)


def record(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "record.json").read_text())


def test_python_from_variable_else_venv_in_checkout(monkeypatch, tmp_path):
    monkeypatch.delenv("SUBSPACE_ABLITERIX_PYTHON", raising=False)
    assert default_python() == REPO_ROOT / ".venv-abliterix" / "bin" / "python"
    monkeypatch.setenv("SUBSPACE_ABLITERIX_PYTHON", str(tmp_path / "py"))
    assert default_python() == tmp_path / "py"


def test_missing_python_names_both_places_and_the_install_script(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "bin" / "python"
    monkeypatch.setenv("SUBSPACE_ABLITERIX_PYTHON", str(missing))
    result = drive(tmp_path, monkeypatch, None)
    assert result.models == [] and result.trials == 0 and result.log is None
    assert str(missing) in result.error and "SUBSPACE_ABLITERIX_PYTHON" in result.error
    assert str(REPO_ROOT / ".venv-abliterix" / "bin" / "python") in result.error
    assert "scripts/install_peers.sh abliterix" in result.error
    assert not (tmp_path / "work").exists()  # nothing written before abliterix is known to be there


def test_not_a_model_and_empty_prompt_sets_are_errors(tmp_path, monkeypatch):
    python = fake_python(tmp_path)
    result = run_abliterix(tmp_path, tmp_path / "work", **SETS, python=python)
    assert result.models == [] and "no config.json" in result.error
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    result = run_abliterix(model, tmp_path / "work", **{**SETS, "harmless_eval": []}, python=python)
    assert result.models == [] and "no prompts in harmless_eval" in result.error
    assert not (tmp_path / "work").exists()


def test_config_keeps_abliterix_defaults_and_round_trips_through_toml(tmp_path):
    dirs = {name: tmp_path / name for name in SETS}
    config = abliterix_config(tmp_path / "m", dirs, tmp_path / "ck", trials=None, system_prompt=None)
    assert tomllib.loads(to_toml(config)) == config
    # abliterix's own trial count (200) and everything else it defaults stay unset here
    assert config["optimization"] == {"checkpoint_dir": str((tmp_path / "ck").resolve())}
    assert set(config) == {"seed", "system_prompt", "model", "optimization", *driver.PROMPT_FIELDS}
    assert config["seed"] == 0 and config["system_prompt"] == ""
    assert config["model"] == {"model_id": str((tmp_path / "m").resolve())}
    assert config["target_prompts"] == {"dataset": str(dirs["harmful_train"].resolve()), "split": "train",
                                        "column": "text"}
    assert config["benign_eval_prompts"]["dataset"] == str(dirs["harmless_eval"].resolve())

    config = abliterix_config(tmp_path / "m", dirs, tmp_path / "ck", trials=10, system_prompt=TRICKY,
                              extra_config={"inference": {"max_gen_tokens": 48, "batch_size": 16},
                                            "model": {"dtype_fallback_order": ["float32"]}, "seed": None,
                                            "kl": {"prune_threshold": None}})
    assert tomllib.loads(to_toml(config)) == config
    assert config["optimization"]["num_trials"] == 10 and config["optimization"]["num_warmup_trials"] == 3
    assert config["model"] == {"model_id": str((tmp_path / "m").resolve()), "dtype_fallback_order": ["float32"]}
    assert config["inference"] == {"max_gen_tokens": 48, "batch_size": 16} and "seed" not in config
    assert config["system_prompt"] == TRICKY and config["kl"] == {}
    with pytest.raises(ValueError):
        abliterix_config(tmp_path / "m", dirs, tmp_path / "ck", trials=0, system_prompt=None)


def test_prompt_sets_load_back_with_split_train(tmp_path):
    from datasets import ReadInstruction, load_from_disk

    paths = write_prompt_sets(tmp_path, SETS)
    for name, prompts in SETS.items():
        dataset = load_from_disk(str(paths[name]))
        assert list(dataset["text"]) == prompts
        # what abliterix does with a saved dataset and the split "train"
        assert ReadInstruction.from_spec("train").to_absolute({str(dataset.split): len(dataset)})[0].to == len(prompts)


def test_command_line_runs_abliterix_unattended(tmp_path, monkeypatch):
    monkeypatch.setenv("AX_CONFIG", "elsewhere.toml")  # abliterix reads AX_* variables: none may reach it
    monkeypatch.setenv("AX_OPTIMIZATION__NUM_TRIALS", "1")
    monkeypatch.setenv("PYTHONPATH", "/nowhere")
    python = fake_python(tmp_path)
    work = (tmp_path / "work").resolve()
    assert command(python, work / "abliterix.toml", work / "model") == [
        str(python), "-c", "import sys; from abliterix.cli import main; sys.exit(main())",
        "--config", str(work / "abliterix.toml"), "--non-interactive", "--overwrite-checkpoint",
        "--non-interactive-output-dir", str(work / "model")]
    result = drive(tmp_path, monkeypatch, python)
    assert result.error is None, result.error
    seen = record(tmp_path)
    assert seen["argv"] == command(python, work / "abliterix.toml", work / "model")[1:]
    assert seen["cwd"] == str(work) and seen["stdin"] == "" and not seen["stdin_tty"]
    assert seen["env"] == {"AX_CONFIG": None, "AX_OPTIMIZATION__NUM_TRIALS": None, "PYTHONPATH": None,
                           "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    config = tomllib.loads((work / "abliterix.toml").read_text())
    assert config["optimization"]["num_trials"] == 5 and config["optimization"]["checkpoint_dir"] == str(
        work / "checkpoints")


def test_result_is_the_exported_model_with_abliterix_numbers(tmp_path, monkeypatch):
    result = drive(tmp_path, monkeypatch, fake_python(tmp_path))
    assert result.error is None, result.error
    work = (tmp_path / "work").resolve()
    assert result.models == [work / "model"] and result.log == work / "abliterix.log"
    # the fewest refusals, then the lowest KL: trial 3 (0 of 2 refused, KL 0.3)
    assert result.scores == [{"trial": 3.0, "refusals": 0.0, "prompts": 2.0, "kl_divergence": 0.3}]
    assert result.baseline_refusals == 2
    assert result.trials == 4  # trial 2 was pruned
    assert [s["trial"] for s in result.trial_scores] == [1, 3, 4, 5]
    assert [s["pareto"] for s in result.trial_scores] == [1.0, 1.0, 1.0, 0.0]
    assert result.trial_scores[2] == {"trial": 4.0, "refusals": 1.0, "prompts": 2.0, "kl_divergence": 0.1,
                                      "pareto": 1.0}
    assert "Export verified" in result.log.read_text()


def test_without_its_journal_the_log_gives_the_trials(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_ABLITERIX", "nojournal")
    result = drive(tmp_path, monkeypatch, fake_python(tmp_path))
    assert result.error is None, result.error
    assert result.trials == 4 and [s["trial"] for s in result.trial_scores] == [1, 3, 4, 5]
    assert result.trial_scores[0] == {"trial": 1.0, "refusals": 2.0, "prompts": 2.0, "kl_divergence": 0.05}


def test_reused_work_dir_starts_afresh(tmp_path, monkeypatch):
    stale = tmp_path / "work" / "model"
    stale.mkdir(parents=True)
    (stale / "leftover.bin").write_text("old")
    (tmp_path / "work" / "checkpoints").mkdir()
    (tmp_path / "work" / "checkpoints" / "old.jsonl").write_text("[]")
    result = drive(tmp_path, monkeypatch, fake_python(tmp_path))
    assert result.error is None and not (stale / "leftover.bin").exists() and result.trials == 4


@pytest.mark.parametrize("mode, says", [("crash", "fake abliterix broke"),
                                        ("noexport", "without exporting a model")])
def test_failures_come_back_as_errors(tmp_path, monkeypatch, mode, says):
    monkeypatch.setenv("FAKE_ABLITERIX", mode)
    result = drive(tmp_path, monkeypatch, fake_python(tmp_path))
    assert result.models == [] and result.scores == [] and result.error is not None and says in result.error
    assert result.log is not None and result.trials == 4 and result.baseline_refusals == 2


def test_another_version_is_named_when_it_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_ABLITERIX", "crash")
    monkeypatch.setenv("FAKE_VERSION", "9.9.9")
    result = drive(tmp_path, monkeypatch, fake_python(tmp_path))
    assert f"reads abliterix {ABLITERIX_VERSION}'s output" in result.error and "has 9.9.9" in result.error


def test_timeout_stops_abliterix(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_ABLITERIX", "hang")
    start = time.monotonic()
    result = drive(tmp_path, monkeypatch, fake_python(tmp_path), timeout_s=2)
    assert time.monotonic() - start < 20
    assert result.models == [] and "did not finish within 2 s" in result.error
