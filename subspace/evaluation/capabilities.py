"""Capability benchmarks before and after an edit: lm-evaluation-harness on the base model and on the edited one.

`compare_capabilities` wraps the already-loaded model in lm-eval's `HFLM` and runs `lm_eval.simple_evaluate` twice
in this process: on the model as it is, then with the edit merged into its weights (`ProjectionEdit.merged`, the
originals copied back bit-exactly after) or, with `apply="hooks"`, as forward hooks. Both runs see the same
documents, few-shot examples and seeds, so the difference is the edit's. `scripts/capabilities.py` is the Hydra
shell over it; `docs/capabilities.md` says how to run it.

lm-eval is an optional dependency (`pip install "subspace[capabilities]"`); it is imported only when needed.
"""

from __future__ import annotations

import difflib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from subspace.utils.io import atomic_path, write_json

log = logging.getLogger(__name__)

EDIT_FILE = "edit.safetensors"
RUN_CONFIG = Path(".hydra") / "config.yaml"
JSON_NAME, MARKDOWN_NAME = "capabilities.json", "capabilities.md"
APPLY_MODES = ("merged", "hooks")
INSTALL_HINT = 'pip install "subspace[capabilities]"'
# what lm-eval keeps per task beside the metrics; "samples" (every document) and "configs" (task configs with
# functions in them) stay out of the JSON
RAW_KEYS = ("results", "groups", "group_subtasks", "n-samples", "n-shot", "higher_is_better", "versions")


MIN_LM_EVAL = (0, 4, 3)  # TaskManager(include_defaults=), simple_evaluate(fewshot_random_seed=)


def require_lm_eval():
    """The `lm_eval` module, or an ImportError that says how to install it (or that it is too old)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (the extra's torch/transformers side)
    except ImportError as err:
        raise ImportError(f"capability benchmarks need lm-evaluation-harness (PyPI: lm-eval), which is not installed "
                          f"({err}): {INSTALL_HINT}") from err
    try:
        installed = version("lm-eval")
    except PackageNotFoundError:  # a source checkout on the path: trust it
        return lm_eval
    numbers = tuple(int(p) for p in installed.split(".")[:3] if p.isdigit())
    if numbers < MIN_LM_EVAL:
        raise ImportError(f"lm-eval {installed} is older than {'.'.join(map(str, MIN_LM_EVAL))}, the first this "
                          f"project runs with: pip install -U \"subspace[capabilities]\"")
    return lm_eval


# ---------------------------------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class RunFiles:
    """A train.py run directory: its edit and, when present, the configuration it ran with."""

    run_dir: Path
    edit: Path
    config: Path | None  # .hydra/config.yaml; None when the directory has none (then the model must be named)


def locate_run(edit: str | Path | None) -> RunFiles:
    """The run behind `edit=`: a train.py run directory (or its edit.safetensors). Fails naming the value."""
    if edit is None or str(edit).strip() in ("", "???"):
        raise ValueError("edit= is required: pass the directory of a finished train.py run (outputs/DATE/TIME, "
                         f"holding {EDIT_FILE} and {RUN_CONFIG}), e.g. edit=outputs/2026-01-01/12-00-00")
    path = Path(edit).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"edit={edit} does not exist; pass the directory of a finished train.py run "
                                f"(holding {EDIT_FILE} and {RUN_CONFIG})")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"edit={edit} is a file but not an {EDIT_FILE}; pass a train.py run directory")
        run_dir, edit_file = path.parent, path
    else:
        run_dir, edit_file = path, path / EDIT_FILE
        if not edit_file.is_file():
            nested = sorted(str(p.parent) for p in path.glob(f"*/{EDIT_FILE}"))[:5]
            hint = (f"; the runs below it are {', '.join(nested)} (a multirun sweep: pass one of them)" if nested
                    else "; a run writes it once the fit has finished (an interrupted run resumes with "
                         "`python train.py ckpt_path=last hydra.run.dir=RUN_DIR`)")
            raise FileNotFoundError(f"edit={edit} holds no {EDIT_FILE}, so it is not a finished train.py run "
                                    f"directory{hint}")
    config = run_dir / RUN_CONFIG
    return RunFiles(run_dir, edit_file, config if config.is_file() else None)


def run_model_config(run: RunFiles, model: Mapping | None = None):
    """The `model` node to instantiate: `model` when given (model=NAME on the command line), else the run's own
    from its .hydra/config.yaml, interpolations (`${paths.cache_dir}`) resolved against the run's configuration."""
    from omegaconf import DictConfig, OmegaConf

    if model is not None:
        return model
    if run.config is None:
        raise FileNotFoundError(f"{run.run_dir} has no {RUN_CONFIG}, so the model the edit was fitted on is unknown; "
                                "name it with model=NAME (a conf/model config, with its overrides as in the run)")
    cfg = OmegaConf.load(run.config)
    node = cfg.get("model") if isinstance(cfg, DictConfig) else None
    if node is None or "_target_" not in node:
        raise ValueError(f"{run.config} has no model._target_ (is it a train.py run's configuration?); "
                         "name the model with model=NAME")
    return node


def load_model(model_cfg, device: str = "auto", dtype: str | None = None):
    """Instantiate the run's model bundle on `device` ("auto": the GPU when there is one), in `dtype` when given
    (set in the model's config when it takes one, so a large model is never first loaded in float32)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf, open_dict

    from subspace.models.bundle import resolve_device, resolve_dtype

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype) if dtype is not None else None
    if OmegaConf.is_config(model_cfg):
        model_cfg = model_cfg.copy()  # keeps its parent: `${paths.cache_dir}` still resolves
        takes = _parameters(model_cfg.get("_target_"))
        with open_dict(model_cfg):
            if "device" in model_cfg or "device" in takes:
                model_cfg.device = device
            if dtype is not None and ("dtype" in model_cfg or "dtype" in takes):
                model_cfg.dtype = dtype
    bundle = instantiate(model_cfg)
    bundle.model.to(device=device, dtype=torch_dtype) if torch_dtype is not None else bundle.model.to(device)
    bundle.model.eval().requires_grad_(False)
    if bundle.tokenizer.pad_token is None:
        bundle.tokenizer.pad_token = bundle.tokenizer.eos_token
    return bundle


def _parameters(target: str | None) -> set[str]:
    """The keyword parameters of a model config's `_target_` (empty when it cannot be read)."""
    import inspect

    from hydra.utils import get_method

    try:
        return set(inspect.signature(get_method(target)).parameters) if target else set()
    except (ImportError, ValueError, TypeError, AttributeError):
        return set()


def check_scorable(bundle) -> None:
    """lm-eval's HFLM scores a causal LM by next-token log-likelihood; a masked-diffusion model has no such score."""
    from subspace.families import family_for

    family = family_for(bundle.model, **bundle.family_options)
    if family.name != "causal":
        raise ValueError(f"{bundle.name} ({type(bundle.model).__name__}) is a {family.name} model: lm-evaluation-"
                         "harness's HFLM scores causal language models by next-token log-likelihood, which a diffusion "
                         "model does not have; capability benchmarks run on causal models (including MoE) only")


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class Settings:
    """What both lm-eval runs share."""

    limit: int | float | None = None  # examples per task; a float in (0, 1): that share of each task
    batch_size: int | str = 8  # or "auto" / "auto:N" (lm-eval's own search, GPU)
    num_fewshot: int | None = None  # None: each task's own default
    apply: str = "merged"  # the edit merged into the weights, or "hooks" on the writers' outputs
    apply_chat_template: bool = False
    max_length: int | None = None  # None: from the model's config
    bootstrap_iters: int = 100_000  # lm-eval's stderr bootstrap (0: none)
    seed: int = 0  # python, numpy, torch and few-shot seeds of both runs

    def __post_init__(self) -> None:
        limit = self.limit
        if limit is not None:
            numeric = not isinstance(limit, bool) and isinstance(limit, (int, float))
            if not numeric or limit <= 0 or (limit >= 1 and not float(limit).is_integer()):
                raise ValueError(f"limit={limit!r} must be a positive number of examples per task, a share in "
                                 "(0, 1), or null (every example)")
            if limit >= 1:
                self.limit = int(limit)
        bs = self.batch_size
        if isinstance(bs, str) and bs.isdigit():
            bs = self.batch_size = int(bs)
        valid_auto = isinstance(bs, str) and (bs == "auto" or (bs.startswith("auto:") and _is_number(bs[5:])))
        if not valid_auto and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 1):
            raise ValueError(f"batch_size={bs!r} must be a positive integer, 'auto' or 'auto:N'")
        if self.num_fewshot is not None and (isinstance(self.num_fewshot, bool) or not isinstance(self.num_fewshot, int)
                                             or self.num_fewshot < 0):
            raise ValueError(f"num_fewshot={self.num_fewshot!r} must be a non-negative integer, or null (each task's "
                             "own default)")
        if self.apply not in APPLY_MODES:
            raise ValueError(f"apply={self.apply!r} is not one of {APPLY_MODES}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 1):
            raise ValueError(f"max_length={self.max_length!r} must be a positive integer, or null (the model's own)")
        if not isinstance(self.bootstrap_iters, int) or self.bootstrap_iters < 0:
            raise ValueError(f"bootstrap_iters={self.bootstrap_iters!r} must be a non-negative integer")


def _lm_eval_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm-eval")
    except PackageNotFoundError:
        return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def task_list(tasks: Any) -> list[str]:
    """`tasks=[a,b]` (or one name) as a list of non-empty names."""
    if isinstance(tasks, str):
        tasks = [tasks]
    names = [str(t).strip() for t in (tasks or [])] if not isinstance(tasks, (int, float)) else []
    if not names or any(not n for n in names):
        raise ValueError(f"tasks={tasks!r} must name lm-eval tasks, e.g. tasks=[arc_easy,hellaswag] "
                         "(`lm-eval ls tasks` lists them; include_path=DIR adds task YAMLs of your own)")
    return names


def task_manager(include_path: str | Sequence[str] | None = None, include_defaults: bool = True):
    """lm-eval's TaskManager over its own tasks and those under `include_path` (checked to exist)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    for path in paths:
        if not Path(path).expanduser().exists():
            raise FileNotFoundError(f"include_path={path} does not exist; pass a directory of lm-eval task YAMLs")
    return TaskManager(include_path=[str(Path(p).expanduser()) for p in paths] or None,
                       include_defaults=include_defaults)


def check_tasks(manager, tasks: Sequence[str]) -> None:
    """Every name a task, group or tag that `manager` knows (or a task YAML path), else the nearest names."""
    known = set(manager.all_tasks)
    for name in tasks:
        if name in known or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"tasks: {name!r} is not an lm-eval task, group or tag ({len(known)} known).{hint} "
                         "`lm-eval ls tasks` lists them; include_path=DIR adds task YAMLs of your own")


# ----------------------------------------------------------------------------------------------- the report
@dataclass
class Row:
    task: str
    metric: str
    filter: str
    base: float
    edited: float
    difference: float
    base_stderr: float | None = None
    edited_stderr: float | None = None
    higher_is_better: bool | None = None
    n: int | None = None

    @property
    def label(self) -> str:
        return self.metric if self.filter == "none" else f"{self.metric} ({self.filter})"


@dataclass
class CapabilityReport:
    tasks: list[str]
    rows: list[Row]
    changed: dict[str, dict[str, Any]]  # per task: documents whose outputs the edit changed
    settings: Settings
    raw: dict[str, dict] = field(default_factory=dict)  # "base" / "edited": lm-eval's results, less samples/configs
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return self.meta | {"tasks": self.tasks, "settings": asdict(self.settings),
                            "rows": [asdict(r) | {"label": r.label} for r in self.rows],
                            "changed_samples": self.changed, "lm_eval": self.raw}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def compare_results(base: Mapping[str, Any], edited: Mapping[str, Any]) -> list[Row]:
    """One row per (task or group, metric, filter) that both runs scored with a number."""
    rows = []
    for task, metrics in base["results"].items():
        other = edited["results"].get(task, {})
        higher = base.get("higher_is_better", {}).get(task, {})
        n = base.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            if "," not in key:  # "alias", "name", "sample_len", ...
                continue
            metric, filt = key.split(",", 1)
            if metric.endswith("_stderr"):
                continue
            b, e = _number(value), _number(other.get(key))
            if b is None or e is None:
                continue
            stderr = f"{metric}_stderr,{filt}"
            rows.append(Row(task, metric, filt, b, e, e - b, _number(metrics.get(stderr)), _number(other.get(stderr)),
                            higher.get(metric), n))
    return rows


def _loglikelihoods(resps: Any) -> list[float] | None:
    """The log-likelihoods in one sample's filtered responses ((ll, is_greedy) pairs or bare numbers), else None."""
    items = resps if isinstance(resps, (list, tuple)) else [resps]
    out = []
    for item in items:
        if isinstance(item, (list, tuple)) and item and _number(item[0]) is not None and not isinstance(item[0], str):
            out.append(float(item[0]))
        elif not isinstance(item, str) and _number(item) is not None:
            out.append(float(item))
        else:
            return None
    return out


def changed_samples(base: Mapping[str, Any], edited: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task: how many documents' outputs differ between the runs and, for log-likelihood tasks, the largest
    change of a log-likelihood. 0 changed everywhere means the edit did not reach the model."""
    out = {}
    for task, samples in base.get("samples", {}).items():
        key = lambda s: (s["doc_id"], s.get("filter", "none"))  # noqa: E731
        other = {key(s): s for s in edited.get("samples", {}).get(task, [])}
        changed, compared, largest = 0, 0, None
        for sample in samples:
            twin = other.get(key(sample))
            if twin is None:
                continue
            compared += 1
            a, b = sample.get("filtered_resps"), twin.get("filtered_resps")
            la, lb = _loglikelihoods(a), _loglikelihoods(b)
            if la is not None and lb is not None and len(la) == len(lb):
                delta = max((abs(x - y) for x, y in zip(la, lb)), default=0.0)
                largest = delta if largest is None else max(largest, delta)
                changed += delta > 0
            else:
                changed += str(a) != str(b)
        out[task] = {"compared": compared, "changed": changed, "max_abs_loglikelihood_change": largest}
    return out


def format_table(rows: Sequence[Row]) -> str:
    """A markdown table: task, metric, base, edited, difference (± lm-eval's stderr where it gives one)."""
    def cell(value: float, stderr: float | None) -> str:
        return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")

    lines = ["| task | metric | n | base | edited | difference |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        arrow = {True: " ↑", False: " ↓"}.get(r.higher_is_better, "")
        lines.append(f"| {r.task} | {r.label}{arrow} | {'' if r.n is None else r.n} | {cell(r.base, r.base_stderr)} "
                     f"| {cell(r.edited, r.edited_stderr)} | {r.difference:+.4f} |")
    if not rows:
        lines.append("| (no numeric metric) | | | | | |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- running
def compare_capabilities(bundle, edit, tasks: Sequence[str], settings: Settings | None = None,
                         manager=None) -> CapabilityReport:
    """lm-eval on `bundle.model` as it is and with `edit` applied; the model is left bit-exactly as it was."""
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    settings = settings or Settings()
    tasks = task_list(tasks)
    check_scorable(bundle)
    model = bundle.model
    if settings.apply == "merged" and not edit.has_weight_form(model):
        raise ValueError("this edit projects module outputs (moe_scope=layer_output, or edit_at=residual) and has no "
                         "weight form to merge; pass apply=hooks to evaluate it as forward hooks")
    manager = manager if manager is not None else task_manager()
    check_tasks(manager, tasks)
    lm = HFLM(pretrained=model, tokenizer=bundle.tokenizer, batch_size=settings.batch_size,
              max_length=settings.max_length)

    def evaluate(which: str) -> dict:
        start = time.time()
        log.info("lm-eval on the %s model: %s", which, ", ".join(tasks))
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), num_fewshot=settings.num_fewshot, batch_size=settings.batch_size,
            limit=settings.limit, bootstrap_iters=settings.bootstrap_iters, log_samples=True,
            apply_chat_template=settings.apply_chat_template, task_manager=manager, random_seed=settings.seed,
            numpy_random_seed=settings.seed, torch_random_seed=settings.seed, fewshot_random_seed=settings.seed)
        if results is None:
            raise RuntimeError("lm-eval returned no results (only rank 0 of a distributed launch does); run "
                               "scripts/capabilities.py as a single process")
        results["wall_time_s"] = round(time.time() - start, 1)
        return results

    base = evaluate("base")
    with edit.merged(model) if settings.apply == "merged" else edit.applied(model):
        edited = evaluate("edited")
    raw = {which: {k: r[k] for k in RAW_KEYS if k in r} | {"wall_time_s": r["wall_time_s"]}
           for which, r in (("base", base), ("edited", edited))}
    return CapabilityReport(list(tasks), compare_results(base, edited), changed_samples(base, edited), settings, raw,
                            {"lm_eval_version": _lm_eval_version()})


def output_paths(out: str | Path | None, run_dir: Path) -> tuple[Path, Path]:
    """(JSON, markdown): `out` a .json file (the markdown beside it) or a directory; None: the run directory."""
    if out is None:
        base = run_dir
    else:
        base = Path(out).expanduser()
        if base.suffix == ".json":
            return base, base.with_suffix(".md")
        if base.exists() and not base.is_dir():
            raise ValueError(f"out={out} is an existing file that is not a .json; pass a directory or a .json path")
    return base / JSON_NAME, base / MARKDOWN_NAME


def write_report(report: CapabilityReport, json_path: Path, markdown_path: Path) -> None:
    import json

    from lm_eval.utils import handle_non_serializable

    data = json.loads(json.dumps(report.to_json(), default=handle_non_serializable))  # numpy and other lm-eval values
    write_json(json_path, data)
    meta = report.meta
    header = [f"# Capabilities: {meta.get('model', '?')}, base vs edited", "",
              f"- run: `{meta.get('run_dir', '?')}` (edit `{meta.get('edit', '?')}`, applied {report.settings.apply})",
              f"- lm-eval {meta.get('lm_eval_version')}; limit {report.settings.limit}, num_fewshot "
              f"{report.settings.num_fewshot}, batch size {report.settings.batch_size}, seed {report.settings.seed}",
              "- documents whose outputs the edit changed: " + ", ".join(
                  f"{task} {c['changed']}/{c['compared']}" for task, c in report.changed.items()), ""]
    with atomic_path(markdown_path) as tmp:
        tmp.write_text("\n".join(header) + "\n" + format_table(report.rows) + "\n")


def evaluate_run(edit: str | Path, tasks: Any, settings: Settings, *, model: Mapping | None = None,
                 device: str = "auto", dtype: str | None = None, include_path: str | Sequence[str] | None = None,
                 include_defaults: bool = True, out: str | Path | None = None
                 ) -> tuple[CapabilityReport, dict[str, Path]]:
    """Everything `scripts/capabilities.py` does: the run's model, base vs edited, the JSON and markdown written.
    Bad input fails before the model loads."""
    from subspace.interventions.edit import ProjectionEdit
    from subspace.reporting import git_commit, git_dirty, versions

    start = time.time()
    run = locate_run(edit)
    names = task_list(tasks)
    json_path, markdown_path = output_paths(out, run.run_dir)
    model_cfg = run_model_config(run, model)
    manager = task_manager(include_path, include_defaults)
    check_tasks(manager, names)
    projection = ProjectionEdit.load(run.edit)

    bundle = load_model(model_cfg, device, dtype)
    fitted_on = projection.meta.get("model")
    if fitted_on is not None and fitted_on != bundle.name:
        log.warning("the edit was fitted on %r but the model loaded is %r: its sites must still exist (same "
                    "architecture), and the scores are those of this model", fitted_on, bundle.name)
    report = compare_capabilities(bundle, projection, names, settings, manager)
    report.meta = {"model": bundle.name, "model_source": bundle.source, "run_dir": str(run.run_dir),
                   "edit": str(run.edit), "edit_meta": projection.meta, "device": str(bundle.model.device),
                   "dtype": str(next(bundle.model.parameters()).dtype).removeprefix("torch."),
                   **report.meta, "versions": versions(), "git_commit": git_commit(), "git_dirty": git_dirty(),
                   "wall_time_s": round(time.time() - start, 1)}
    write_report(report, json_path, markdown_path)
    return report, {"json": json_path, "markdown": markdown_path}
