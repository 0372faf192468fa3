"""Runs heretic (`heretic-llm` 1.4.0 on PyPI, AGPL-3.0) as a separate program, so that the benchmark compares
this project with heretic itself while heretic stays out of this project's dependencies and source.

Heretic lives in a venv of its own (`scripts/install_peers.sh heretic`) and reads `config.toml` from its working directory, written
here. Whatever it still asks at the end (which Pareto-optimal trial, what to do with it, where to save it) is
answered through its line-based prompt mode: numbered choices read with `input()`, meant for notebooks that
run heretic as a subprocess and switched on by the `KAGGLE_KERNEL_RUN_TYPE` variable. So plain pipes suffice
(no terminal, no key codes), and entries are chosen by their text: a reordered menu still works, a changed
one is reported as an error instead of being guessed at.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import os
import re
import select
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from subspace.baselines.process import peer_env, stop
from subspace.config import REPO_ROOT

HERETIC_VERSION = "1.4.0"
# heretic-llm lives in its own git-ignored venv inside the checkout (never a dependency); the variable overrides it
HERETIC_VENV = REPO_ROOT / ".venv-heretic"
DEFAULT_PYTHON = Path(os.environ.get("SUBSPACE_HERETIC_PYTHON", HERETIC_VENV / "bin" / "python"))
# the script pins torch before heretic, which leaves it open (an open range downloads a multi-GB CUDA build)
INSTALL = "scripts/install_peers.sh heretic"
# heretic's config field for each prompt set: its "bad"/"good" prompts are our harmful/harmless ones.
PROMPT_FIELDS = {"bad_prompts": "harmful_train", "good_prompts": "harmless_train",
                 "bad_evaluation_prompts": "harmful_eval", "good_evaluation_prompts": "harmless_eval"}
QUESTION_WAIT_S = 60.0  # a question the driver does not know, left unanswered this long, ends the run
_LAUNCH = "import sys; from heretic.main import main; sys.exit(main())"
_NUMBER_PROMPT = "Enter number: "
_CHOICE = re.compile(r"^\[(\d+)\] (.*)$")
_BANNER = re.compile(r"^█\S*\s+v(\S+)$", re.M)  # heretic's first line: ASCII-art letters, then its version
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_TRIAL = re.compile(r"\[Trial\s+(\d+)\] Refusals:\s*(\d+)/(\d+), KL divergence: ([0-9.eE+-]+)")
log = logging.getLogger(__name__)


@dataclass
class HereticResult:
    models: list[Path]          # one saved HF model directory per Pareto-optimal trial heretic offered
    trials: int                 # Optuna trials run
    wall_seconds: float
    error: str | None = None    # why heretic could not run / produced nothing (then models == [])
    log: Path | None = None     # heretic's captured terminal output
    # heretic's own numbers for each saved model, in the same order: trial, refusals, prompts, kl_divergence
    scores: list[dict[str, float]] = field(default_factory=list)


def heretic_config(model_dir: Path, data_dirs: dict[str, Path], trials: int, system_prompt: str | None,
                   extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """heretic's settings for one unattended run; `extra_config` replaces top-level keys (None drops one)."""
    config: dict[str, Any] = {
        "model": str(Path(model_dir).resolve()),
        "dtypes": ["float32"],  # heretic tries bf16/fp16 first; this project measures in float32
        "batch_size": 16,  # skips heretic's batch-size search, which costs minutes on CPU
        "n_trials": trials,
        # heretic's defaults explore randomly for 60 of 200 trials; keep that share for shorter studies.
        "n_startup_trials": max(1, math.ceil(0.3 * trials)),
        "seed": 0,
        # heretic always sends a system turn; an empty one is the closest it has to none.
        "system_prompt": system_prompt or "",
        "export_strategy": "merge",  # saves a full HF model instead of asking merge-or-adapter
        "study_checkpoint_dir": "checkpoints",
    }
    for key, name in PROMPT_FIELDS.items():
        config[key] = {"dataset": str(data_dirs[name]), "split": "train", "column": "text"}
    config.update(extra_config or {})
    return {k: v for k, v in config.items() if v is not None}


def to_toml(config: dict[str, Any]) -> str:
    """TOML for a flat dict of scalars, lists and dicts (as inline tables): enough for heretic's settings."""
    return "".join(f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in config.items() if v is not None)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_string(text: str) -> str:
    escaped = (('\\"' if c == '"' else "\\\\" if c == "\\" else
                f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c) for c in text)
    return '"' + "".join(escaped) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value)
                else repr(value))
    if isinstance(value, (str, Path)):
        return _toml_string(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None)
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML: {value!r}")


def write_prompt_sets(data_dir: Path, sets: dict[str, list[str]]) -> dict[str, Path]:
    """Each list as a `datasets` directory with one "text" column: heretic reads those with load_from_disk."""
    import datasets

    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        paths = {}
        for name, prompts in sets.items():
            paths[name] = Path(data_dir) / name
            datasets.Dataset.from_dict({"text": [str(p) for p in prompts]}).save_to_disk(str(paths[name]))
        return paths
    finally:
        if not quiet:
            datasets.enable_progress_bars()


class _Unexpected(Exception):
    """heretic asked something this driver does not know how to answer."""


class _Session:
    """Heretic's questions and the answers that save every Pareto-optimal trial it offers, one folder each."""

    def __init__(self, models_dir: Path):
        self.models_dir = models_dir
        self.front: list[str] | None = None  # the trial menu's entries, best first as heretic sorts them
        self.current = -1                    # position in `front` of the trial being saved
        self.path_given = False

    def answer(self, pending: str) -> str | None:
        """The line to type for heretic's output since the last answer, or None while it is still working."""
        text = _ANSI.sub("", pending).replace("\r\n", "\n")
        if text.endswith(_NUMBER_PROMPT):
            return self._choose(*_menu(text[: -len(_NUMBER_PROMPT)]))
        last = text.rsplit("\n", 1)[-1]
        if last.startswith("Path to the folder:"):
            self.path_given = True
            return str(self.models_dir / str(self.current))
        if last.startswith("How many additional trials"):
            raise _Unexpected("heretic asks for additional trials, which the driver never requests")
        return None

    def _choose(self, question: str, choices: list[tuple[str, str]]) -> str:
        if not choices:
            raise _Unexpected(f"heretic rejected the driver's last answer or showed an empty menu: {question!r}")
        if question.startswith("Which trial do you want to use?"):
            trials = [title for _, title in choices if title.startswith("[Trial")]
            if self.front is None:
                self.front = trials
            if self.current + 1 >= len(self.front):
                return _pick(question, choices, "Exit program")
            self.current += 1
            self.path_given = False
            return _pick(question, choices, self.front[self.current])
        if question.startswith("What do you want to do with the decensored model?"):
            wanted = "Return to the trial selection menu" if self.path_given else "Save the model to a local folder"
            return _pick(question, choices, wanted)
        if question.startswith("How would you like to proceed?"):  # a checkpoint from an earlier run
            return _pick(question, choices, "Ignore the previous run and start from scratch")
        if question.startswith("How do you want to export the model?"):
            return _pick(question, choices, "Merge")
        raise _Unexpected(f"heretic asks a question the driver does not know: {question!r} "
                          f"{[title for _, title in choices]}")


def _menu(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The question and its numbered (number, title) entries that end `text`."""
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    choices: list[tuple[str, str]] = []
    while lines and (match := _CHOICE.match(lines[-1])):
        choices.insert(0, (match[1], match[2]))
        lines.pop()
    return (lines[-1].strip() if lines else ""), choices


def _pick(question: str, choices: list[tuple[str, str]], wanted: str) -> str:
    for number, title in choices:
        if title.startswith(wanted):
            return number
    raise _Unexpected(f"heretic's menu {question!r} has no entry {wanted!r} (its menu changed?): "
                      f"{[title for _, title in choices]}")


def _child_env() -> dict[str, str]:
    return peer_env("HERETIC_", KAGGLE_KERNEL_RUN_TYPE="subspace")


def _converse(python: Path, work_dir: Path, session: _Session, log: IO[str], timeout_s: float) -> str | None:
    """Runs heretic to its end, answering its questions; returns why that failed, or None."""
    try:
        proc = subprocess.Popen([str(python), "-c", _LAUNCH], cwd=work_dir, env=_child_env(),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    except OSError as error:
        return f"could not start {python}: {error}"
    assert proc.stdin is not None and proc.stdout is not None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    deadline = time.monotonic() + timeout_s
    pending, quiet_since = "", time.monotonic()
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return f"heretic did not finish within {timeout_s:.0f} s"
            if not select.select([proc.stdout], [], [], min(left, 1.0))[0]:
                last = pending.rsplit("\n", 1)[-1].rstrip()
                if last.endswith((":", "?")) and time.monotonic() - quiet_since > QUESTION_WAIT_S:
                    return f"heretic waits for an answer the driver does not know: {last!r}"
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            text = decoder.decode(chunk)
            log.write(text)
            pending, quiet_since = pending + text, time.monotonic()
            reply = session.answer(pending)
            if reply is not None:
                log.write(reply + "\n")  # as a terminal would echo it
                proc.stdin.write((reply + "\n").encode())
                proc.stdin.flush()
                pending = ""
            log.flush()
        code = proc.wait()
        return None if code == 0 else f"heretic exited with code {code}"
    except _Unexpected as error:
        return str(error)
    except BrokenPipeError:
        return "heretic stopped reading its input"
    finally:
        stop(proc)
        proc.stdin.close()
        proc.stdout.close()


_STUDY = """
import json, sys, optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
optuna.logging.set_verbosity(optuna.logging.WARNING)
storage = JournalStorage(JournalFileBackend(sys.argv[1]))
trials = [t for s in storage.get_all_studies()
          for t in optuna.load_study(study_name=s.study_name, storage=storage).get_trials(deepcopy=False)]
print(json.dumps({"trials": len(trials), "complete": sum(t.state.name == "COMPLETE" for t in trials)}))
"""


def _trials_run(python: Path, work_dir: Path, log_text: str) -> int:
    """Completed trials in heretic's own Optuna study (its checkpoint journal); else as its log counts them."""
    for journal in sorted((work_dir / "checkpoints").glob("*.jsonl")):
        try:
            out = subprocess.run([str(python), "-c", _STUDY, str(journal)], capture_output=True, text=True,
                                 env=_child_env(), timeout=300, check=True).stdout
            return int(json.loads(out.strip().splitlines()[-1])["complete"])
        except (OSError, subprocess.SubprocessError, ValueError, KeyError, IndexError):
            break
    return len(set(re.findall(r"Running trial (\d+) of", log_text)))


def _tail(log_text: str, n: int = 20) -> str:
    lines = [line.rsplit("\r", 1)[-1].rstrip() for line in _ANSI.sub("", log_text).split("\n")]
    return "\n".join([line for line in lines if line.strip()][-n:])


def run_heretic(model_dir: Path, work_dir: Path, *, harmful_train: list[str], harmless_train: list[str],
                harmful_eval: list[str], harmless_eval: list[str], trials: int, system_prompt: str | None,
                python: Path = DEFAULT_PYTHON, timeout_s: float = 3600,
                extra_config: dict | None = None) -> HereticResult:
    """heretic's optimisation on `model_dir` (a save_pretrained directory), every Pareto-optimal trial it
    offers saved as a merged HF model under `work_dir/models/<n>/` (n = its place in heretic's menu).
    Never raises for heretic's failures: those come back as `error`, with the end of its log."""
    start = time.monotonic()
    work_dir = Path(work_dir).resolve()
    log_path = work_dir / "heretic.log"

    def failed(reason: str, trials_run: int = 0, ran: bool = False) -> HereticResult:
        if not (ran and log_path.exists()):
            return HereticResult([], trials_run, time.monotonic() - start, reason, None)
        tail = _tail(log_path.read_text(errors="replace"))
        return HereticResult([], trials_run, time.monotonic() - start,
                             f"{reason}\nlast lines of {log_path}:\n{tail}", log_path)

    python = Path(python)
    if not python.exists():
        return failed(f"heretic's python {python} does not exist; install heretic {HERETIC_VERSION} in its own "
                      f"venv with: {INSTALL} (or point SUBSPACE_HERETIC_PYTHON / python= at one)")
    if not (Path(model_dir) / "config.json").exists():
        return failed(f"{model_dir} is not a saved Hugging Face model (no config.json)")
    sets = {"harmful_train": harmful_train, "harmless_train": harmless_train,
            "harmful_eval": harmful_eval, "harmless_eval": harmless_eval}
    if empty := [name for name, prompts in sets.items() if not prompts]:
        return failed(f"no prompts in {', '.join(empty)}")

    work_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("checkpoints", "models", "data", "heretic.log"):  # a reused work_dir starts afresh
        path = work_dir / stale
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    data_dirs = write_prompt_sets(work_dir / "data", sets)
    (work_dir / "config.toml").write_text(
        to_toml(heretic_config(model_dir, data_dirs, trials, system_prompt, extra_config)), encoding="utf-8")

    session = _Session(work_dir / "models")
    with open(log_path, "w", encoding="utf-8") as out:
        reason = _converse(python, work_dir, session, out, timeout_s)
    log_text = log_path.read_text(errors="replace")
    trials_run = _trials_run(python, work_dir, log_text)
    front = session.front or []
    saved = [(work_dir / "models" / str(n), title) for n, title in enumerate(front)
             if (work_dir / "models" / str(n) / "config.json").exists()]
    if reason is None and not saved:
        reason = ("heretic offered no trial to save" if session.front is not None
                  else "heretic stopped before offering any trial (see its log)")
    if reason is not None and not saved:
        if "No module named 'heretic'" in log_text:
            reason += f"; {python} has no heretic: install it with: {INSTALL}"
        elif (version := _BANNER.search(log_text)) and version[1] != HERETIC_VERSION:
            reason += f" (this driver answers heretic {HERETIC_VERSION}'s prompts; {python} has {version[1]})"
        return failed(reason, trials_run, ran=True)
    if reason is not None:
        log.warning("heretic saved %d of %d models, then: %s", len(saved), len(front), reason)
    scores = [{k: float(v) for k, v in zip(("trial", "refusals", "prompts", "kl_divergence"), m.groups())}
              if (m := _TRIAL.search(title)) else {} for _, title in saved]
    return HereticResult([path for path, _ in saved], trials_run, time.monotonic() - start, None, log_path, scores)
