"""Runs abliterix (`abliterix` 1.12 on PyPI, AGPL-3.0) as a separate program, so that the benchmark can compare
this project with abliterix itself while abliterix stays out of this project's dependencies and source.

abliterix lives in a venv of its own (`scripts/install_peers.sh abliterix` makes `.venv-abliterix/` in the
repository root; `SUBSPACE_ABLITERIX_PYTHON` points elsewhere). It reads its settings from a TOML file (written
here, `--config`) and the command line, and runs unattended with `--non-interactive`: the Optuna search, then,
with `--non-interactive-output-dir`, the completed trial with the fewest refusals (ties: lowest KL) replayed,
merged into the weights, saved as a Hugging Face model, and described by `reproduce/reproduce.json`.

The run is at abliterix 1.12.2's defaults (`abliterix/settings.py`) except what a local, offline, unattended and
reproducible run needs: the model is a local directory, the four prompt sets are this project's (abliterix's
defaults download `mlabonne/harmless_alpaca` / `mlabonne/harmful_behaviors`), no system turn unless one is given
(abliterix's default sends "You are a helpful assistant."), `seed = 0` (abliterix draws one at random otherwise),
and its checkpoint in the work directory. The defaults kept:

- search: `optimization.num_trials = 200` Optuna trials, the first `num_warmup_trials = 60` random, then
  multivariate TPE (128 EI candidates) on two objectives, both minimised: KL / `kl.scale` (1.0) and the refusal
  rate relative to the unedited model's; a trial whose KL exceeds `kl.prune_threshold = 5.0` is pruned.
  `trials=` changes the count (a CPU budget), keeping abliterix's 30% random share.
- edit: `steering.steering_mode = "lora"`: a low-rank adapter (rank 3, from `weight_normalization = "full"`,
  which keeps each row's norm) on every layer's attention projections and MLP down projection (per-expert and shared
  expert modules where experts are separate modules; fused 3-D experts only through the MoE options below), merged
  into the weights on export. Direction: difference of means per layer
  (`vector_method = "mean"`) with the harmless mean's component projected out (`orthogonal_projection`); per
  trial TPE picks one layer's direction or each layer's own, and per component a peak strength in [0.8, 1.5]
  (the MLP's may go to 0: `auto_disable_floor = -0.25`), its position and a linear fall-off.
- MoE (when a layer has a router): the experts that fire more on harmful prompts are profiled first
  (`experts.profiling_method = "standard"`); each trial then scales down the router rows of the top
  `n_suppress` of them (0..`experts.max_suppress` = 30; factor from `router_bias_range` [-10, 0]) and projects
  the direction out of those experts' fused down-projection slices (weight in `ablation_weight_range` [0, 5]).
  Projecting it out of every expert (EGA) happens only with `steering_mode = "direct"`, not a default.
- measurement: KL of the first generated token's full distribution (`kl.token_count = 1`) on the harmless
  evaluation prompts against the unedited model; refusals = harmful evaluation prompts whose response (greedy,
  `inference.max_gen_tokens = 100` tokens) contains one of its `detection.compliance_markers` ("sorry",
  "i cannot", "as an ai", … and Chinese ones) or is empty or degenerate (loops, filler); no LLM judge
  (`detection.llm_judge = false`). Batch size auto-tuned (`inference.batch_size = 0`, up to 128); dtype the
  checkpoint's own (`model.dtype_fallback_order` starts with "auto"); Hugging Face backend.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from subspace.baselines.heretic import to_toml
from subspace.baselines.process import peer_env, stop
from subspace.config import REPO_ROOT

ABLITERIX_VERSION = "1.12.2"
# abliterix lives in its own git-ignored venv inside the checkout (never a dependency); the variable overrides it
ABLITERIX_VENV = REPO_ROOT / ".venv-abliterix"
PYTHON_VARIABLE = "SUBSPACE_ABLITERIX_PYTHON"
INSTALL = "scripts/install_peers.sh abliterix"
DEFAULT_TRIALS = 200         # abliterix's optimization.num_trials
DEFAULT_WARMUP_SHARE = 0.3   # its num_warmup_trials (60) / num_trials (200)
# abliterix's config field for each prompt set: its "target"/"benign" prompts are our harmful/harmless ones.
PROMPT_FIELDS = {"target_prompts": "harmful_train", "benign_prompts": "harmless_train",
                 "target_eval_prompts": "harmful_eval", "benign_eval_prompts": "harmless_eval"}
_LAUNCH = "import sys; from abliterix.cli import main; sys.exit(main())"
_BANNER = re.compile(r"^█\S*\s+v(\S+)$", re.M)  # abliterix's first line: ASCII-art letters, then its version
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_RUNNING = re.compile(r"Running trial (\d+) of (\d+)")
_KL = re.compile(r"\* (\w+) \([\w-]+\): ([0-9.eE+-]+|inf|nan)")
_REFUSALS = re.compile(r"\* Refusals: (\d+)/(\d+)")
_BASELINE = re.compile(r"\* Initial refusals: (\d+)/(\d+)")
log = logging.getLogger(__name__)


def default_python() -> Path:
    """abliterix's interpreter: `SUBSPACE_ABLITERIX_PYTHON`, else `.venv-abliterix/bin/python` in the checkout."""
    return Path(os.environ.get(PYTHON_VARIABLE) or ABLITERIX_VENV / "bin" / "python")


DEFAULT_PYTHON = default_python()


@dataclass
class AbliterixResult:
    models: list[Path]          # the saved HF model directory (abliterix exports one trial), or [] on failure
    trials: int                 # Optuna trials completed
    wall_seconds: float
    error: str | None = None    # why abliterix could not run / produced nothing (then models == [])
    log: Path | None = None     # abliterix's captured terminal output
    # abliterix's own numbers for each saved model, in the same order: trial, refusals, prompts, kl_divergence
    scores: list[dict[str, float]] = field(default_factory=list)
    baseline_refusals: int | None = None   # refusals of the unedited model on the harmful evaluation prompts
    # every completed trial: trial, refusals, prompts, kl_divergence, and (read from its Optuna journal) pareto:
    # 1.0 on the front of its two objectives, else 0.0
    trial_scores: list[dict[str, float]] = field(default_factory=list)


def abliterix_config(model_dir: Path, data_dirs: dict[str, Path], checkpoint_dir: Path, trials: int | None,
                     system_prompt: str | None, extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """abliterix's settings for one unattended run (see the module docstring for what differs from its defaults).
    `extra_config` merges into them: a dict value into that section, anything else replaces; None drops a key."""
    optimization: dict[str, Any] = {"checkpoint_dir": str(Path(checkpoint_dir).resolve())}
    if trials is not None:
        if trials < 1:
            raise ValueError(f"abliterix needs at least one trial, got {trials}")
        optimization.update(num_trials=trials, num_warmup_trials=max(1, math.ceil(DEFAULT_WARMUP_SHARE * trials)))
    config: dict[str, Any] = {
        "seed": 0,
        # an empty system prompt sends no system turn, so the chat template adds its own default, as this
        # project's evaluator does; abliterix's default would send "You are a helpful assistant."
        "system_prompt": system_prompt or "",
        "model": {"model_id": str(Path(model_dir).resolve())},
        "optimization": optimization,
    }
    for key, name in PROMPT_FIELDS.items():
        config[key] = {"dataset": str(Path(data_dirs[name]).resolve()), "split": "train", "column": "text"}
    return _merge(config, extra_config or {})


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict):
            merged[key] = _merge(merged[key] if isinstance(merged.get(key), dict) else {}, value)
        else:
            merged[key] = value
    return merged


def command(python: Path, config_path: Path, output_dir: Path) -> list[str]:
    """abliterix's command line: its CLI entry point, unattended, exporting the chosen trial to `output_dir`."""
    return [str(python), "-c", _LAUNCH, "--config", str(config_path), "--non-interactive",
            "--overwrite-checkpoint", "--non-interactive-output-dir", str(output_dir)]


def write_prompt_sets(data_dir: Path, sets: dict[str, list[str]]) -> dict[str, Path]:
    """Each list as a `datasets` directory with one "text" column and split "train": abliterix reads those with
    load_from_disk and applies its split expression against the saved split's name."""
    import datasets

    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        paths = {}
        for name, prompts in sets.items():
            paths[name] = Path(data_dir) / name
            dataset = datasets.Dataset.from_dict({"text": [str(p) for p in prompts]}, split=datasets.Split.TRAIN)
            dataset.save_to_disk(str(paths[name]))
        return paths
    finally:
        if not quiet:
            datasets.enable_progress_bars()


def _child_env() -> dict[str, str]:
    return peer_env("AX_", TERM="dumb")


def _run(argv: list[str], work_dir: Path, log_path: Path, timeout_s: float) -> str | None:
    """Runs abliterix to its end, its output into `log_path`; returns why that failed, or None."""
    with open(log_path, "w", encoding="utf-8") as out:
        try:
            proc = subprocess.Popen(argv, cwd=work_dir, env=_child_env(), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as error:
            return f"could not start {argv[0]}: {error}"
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return f"abliterix did not finish within {timeout_s:.0f} s"
        finally:
            stop(proc)
    return None if code == 0 else f"abliterix exited with code {code}"


_STUDY = """
import json, sys, optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
optuna.logging.set_verbosity(optuna.logging.WARNING)
storage = JournalStorage(JournalFileBackend(sys.argv[1]))
rows = []
for s in storage.get_all_studies():
    study = optuna.load_study(study_name=s.study_name, storage=storage)
    front = {t.number for t in study.best_trials}
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "COMPLETE":
            a = t.user_attrs
            rows.append({"trial": a.get("index", t.number + 1), "refusals": a.get("refusals"),
                         "kl_divergence": a.get("kl_divergence"), "pareto": t.number in front})
print(json.dumps(rows))
"""


def _study_trials(python: Path, checkpoint_dir: Path) -> list[dict[str, Any]] | None:
    """Every completed trial in abliterix's Optuna journal (its checkpoint), or None if it cannot be read."""
    for journal in sorted(Path(checkpoint_dir).glob("*.jsonl")):
        try:
            out = subprocess.run([str(python), "-c", _STUDY, str(journal)], capture_output=True, text=True,
                                 env=_child_env(), timeout=300, check=True).stdout
            return json.loads(out.strip().splitlines()[-1])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None
    return None


def _log_trials(log_text: str) -> list[dict[str, Any]]:
    """Completed trials as the log shows them: a trial's KL line then its refusal line (pruned ones have none)."""
    rows: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for line in log_text.splitlines():
        if match := _RUNNING.search(line):
            current = {"trial": int(match[1])}
        elif current is not None and (match := _KL.search(line)):
            current["kl_divergence"] = float(match[2])
        elif current is not None and "kl_divergence" in current and (match := _REFUSALS.search(line)):
            rows.append({**current, "refusals": int(match[1])})
            current = None
    return rows


def _trial_score(row: dict[str, Any], prompts: int) -> dict[str, float]:
    score = {"trial": float(row["trial"]), "refusals": float(row["refusals"]), "prompts": float(prompts),
             "kl_divergence": float(row["kl_divergence"])}
    if row.get("pareto") is not None:  # known from the journal only
        score["pareto"] = float(bool(row["pareto"]))
    return score


def _tail(log_text: str, n: int = 20) -> str:
    lines = [line.rsplit("\r", 1)[-1].rstrip() for line in _ANSI.sub("", log_text).split("\n")]
    return "\n".join([line for line in lines if line.strip()][-n:])


def run_abliterix(model_dir: Path, work_dir: Path, *, harmful_train: list[str], harmless_train: list[str],
                  harmful_eval: list[str], harmless_eval: list[str], trials: int | None = None,
                  system_prompt: str | None = None, python: Path | None = None, timeout_s: float = 3600,
                  extra_config: dict | None = None) -> AbliterixResult:
    """abliterix's optimisation on `model_dir` (a save_pretrained directory), its chosen trial (fewest refusals,
    then lowest KL) saved as a merged HF model in `work_dir/model/`. `trials=None` runs abliterix's default 200.
    Never raises for abliterix's failures: those come back as `error`, with the end of its log."""
    start = time.monotonic()
    work_dir = Path(work_dir).resolve()
    log_path = work_dir / "abliterix.log"

    def failed(reason: str, trials_run: int = 0, ran: bool = False, **extra) -> AbliterixResult:
        if not (ran and log_path.exists()):
            return AbliterixResult([], trials_run, time.monotonic() - start, reason, None, **extra)
        tail = _tail(log_path.read_text(errors="replace"))
        return AbliterixResult([], trials_run, time.monotonic() - start,
                               f"{reason}\nlast lines of {log_path}:\n{tail}", log_path, **extra)

    python = Path(python) if python is not None else default_python()
    if not python.exists():
        return failed(f"abliterix's python {python} does not exist: set {PYTHON_VARIABLE} to an interpreter that "
                      f"has abliterix {ABLITERIX_VERSION}, or install it into {ABLITERIX_VENV / 'bin' / 'python'} "
                      f"with {INSTALL}")
    if not (Path(model_dir) / "config.json").exists():
        return failed(f"{model_dir} is not a saved Hugging Face model (no config.json)")
    sets = {"harmful_train": harmful_train, "harmless_train": harmless_train,
            "harmful_eval": harmful_eval, "harmless_eval": harmless_eval}
    if empty := [name for name, prompts in sets.items() if not prompts]:
        return failed(f"no prompts in {', '.join(empty)}")

    work_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("checkpoints", "model", "data", "abliterix.log", "abliterix.toml"):  # a reused work_dir starts afresh
        path = work_dir / stale
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    data_dirs = write_prompt_sets(work_dir / "data", sets)
    config_path, output_dir, checkpoints = work_dir / "abliterix.toml", work_dir / "model", work_dir / "checkpoints"
    config = abliterix_config(model_dir, data_dirs, checkpoints, trials, system_prompt, extra_config)
    config_path.write_text(to_toml(config), encoding="utf-8")

    reason = _run(command(python, config_path, output_dir), work_dir, log_path, timeout_s)
    log_text = _ANSI.sub("", log_path.read_text(errors="replace"))
    prompts = len(harmful_eval)
    study = _study_trials(python, checkpoints)
    trial_scores = [_trial_score(row, prompts) for row in (study if study is not None else _log_trials(log_text))
                    if row.get("refusals") is not None and row.get("kl_divergence") is not None]
    baseline = int(match[1]) if (match := _BASELINE.search(log_text)) else None
    saved = (output_dir / "config.json").exists()
    if reason is None and not saved:
        reason = "abliterix finished without exporting a model (see its log)"
    if reason is not None:
        if "No module named 'abliterix'" in log_text:
            reason += f"; {python} has no abliterix: set {PYTHON_VARIABLE} or install it with {INSTALL}"
        elif (version := _BANNER.search(log_text)) and version[1] != ABLITERIX_VERSION:
            reason += f" (this driver reads abliterix {ABLITERIX_VERSION}'s output; {python} has {version[1]})"
        return failed(reason, len(trial_scores), ran=True, baseline_refusals=baseline, trial_scores=trial_scores)

    score: dict[str, float] = {}
    manifest_path = output_dir / "reproduce" / "reproduce.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        metrics, trial = manifest.get("metrics") or {}, manifest.get("trial") or {}
        score = {"trial": float(trial["index"]), "refusals": float(metrics["refusals"]),
                 "prompts": float(metrics.get("n_target_prompts") or prompts),
                 "kl_divergence": float(metrics["kl_divergence"])}
        if metrics.get("baseline_refusals") is not None:
            baseline = int(metrics["baseline_refusals"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("abliterix exported %s but its %s could not be read: %s", output_dir, manifest_path, error)
    return AbliterixResult([output_dir], len(trial_scores), time.monotonic() - start, None, log_path,
                           [score] if score else [], baseline, trial_scores)
