"""One run: load → fit an edit → evaluate before/after → export. `train.py` is a thin Hydra shell over `run`."""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from subspace.config import REPO_ROOT
from subspace.evaluation.evaluator import Evaluator, build_evaluator
from subspace.export.model_card import write_model_cards
from subspace.export.peft_adapter import export_peft_adapter, save_merged_model
from subspace.interventions.merge import SHARDED_MERGE
from subspace.methods.base import Method, RunContext
from subspace.reporting import git_commit, git_dirty, print_summary, versions
from subspace.utils.io import write_json, write_jsonl
from subspace.utils.sharded import is_sharded

log = logging.getLogger(__name__)
REPORT_KEYS = tuple(f"{prefix}{verdict}_rate_{state}" for prefix in ("", "harmless_")
                    for verdict in ("answer", "refusal", "broken") for state in ("before", "after")) + (
    "kl", "kl_response", "n_harmful", "n_harmless")


def check_output_dir(run_dir: Path, overwrite: bool) -> None:
    if (run_dir / "metrics.json").exists() and not overwrite:
        raise FileExistsError(f"{run_dir} already holds a finished run (metrics.json); choose another "
                              "hydra.run.dir or pass overwrite=true")


def resume_checkpoint(ckpt_path: str | None, callbacks: list) -> str | None:
    """The checkpoint file a resumed run starts from. Lightning itself only warns when `ckpt_path=last` finds
    nothing and trains from scratch, which would silently redo the run under the name of a resumed one."""
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path} is not a checkpoint file")
        return ckpt_path
    dirs = [Path(cb.dirpath) for cb in callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    found = [path for d in dirs for path in d.glob("last*.ckpt")]
    if not found:
        where = ", ".join(map(str, dirs)) if dirs else "no directory: the model_checkpoint callback is off"
        raise FileNotFoundError(f"ckpt_path=last found no last.ckpt in {where}. Resume an interrupted run with "
                                "`python train.py ckpt_path=last hydra.run.dir=RUN_DIR` (RUN_DIR: the run directory "
                                "that holds checkpoints/last.ckpt, with the same overrides as that run), or pass "
                                "ckpt_path=FILE")
    return str(max(found, key=lambda path: path.stat().st_mtime))


def selection_metrics(evaluator: Evaluator, data, edit) -> dict[str, float]:
    """Refusal and KL on the held-back training prompts: what sweeps and tuning may look at (never eval_*)."""
    _, verdicts = evaluator.judged(data["select_harmful"], edit, "select harmful after")
    return {"select_refusal_rate_after": verdicts.count("refusal") / len(verdicts),
            "select_answer_rate_after": verdicts.count("answer") / len(verdicts),
            "select_kl": evaluator.kl(data["select_harmless"], edit)}


SAMPLE_COLUMNS = ("split", "category", "prompt", "before", "verdict_before", "after", "verdict_after")


def log_samples_table(logger, samples: list[dict]) -> None:
    """The before/after samples and their verdicts as a table beside the curves, for loggers that keep tables
    (W&B); the others have samples.jsonl in the run directory."""
    if hasattr(logger, "log_table"):
        logger.log_table("eval/samples", list(SAMPLE_COLUMNS), [[s.get(c) for c in SAMPLE_COLUMNS] for s in samples])


def tuned_overlay() -> str | None:
    """The conf/tuned file this run composed (it overrides conf/method and conf/objective values), if any."""
    try:
        from hydra.core.hydra_config import HydraConfig
        choice = HydraConfig.get().runtime.choices.get("tuned")
    except ValueError:  # not under Hydra (a test composing the config itself)
        return None
    path = f"conf/tuned/{choice}.yaml"
    return path if choice and (REPO_ROOT / path).is_file() else None  # an optional group records absent choices too


def run_command() -> str:
    """The command line that made this run, as a user would retype it."""
    try:
        from hydra.core.hydra_config import HydraConfig
        return " ".join(["python train.py", *HydraConfig.get().overrides.task])
    except ValueError:  # not under Hydra (a test composing the config itself)
        return "python train.py (a config composed in code)"


def shards_the_model(trainer: DictConfig) -> bool:
    """Whether the configured strategy shards the frozen model (trainer=fsdp), known before anything is built."""
    target = OmegaConf.select(trainer, "strategy._target_")
    return target is not None and issubclass(get_class(target), ModelParallelStrategy)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured method and write metrics.json, samples, the edit and its PEFT adapter into the run dir."""
    start = time.time()
    code = {"git_commit": git_commit(), "git_dirty": git_dirty()}  # the code this run started from, not the later HEAD
    run_dir = Path(cfg.paths.output_dir)
    check_output_dir(run_dir, cfg.overwrite or cfg.get("ckpt_path") is not None)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    loggers = [instantiate(c) for c in cfg.logger.values()] if cfg.get("logger") else []
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(resolved)

    callbacks = [instantiate(c) for c in cfg.callbacks.values()] if cfg.get("callbacks") else []
    ckpt_path = resume_checkpoint(cfg.get("ckpt_path"), callbacks)  # before the slow loading
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)

    bundle = instantiate(cfg.model)
    data = instantiate(cfg.data)
    evaluator = build_evaluator(cfg, bundle)
    family = evaluator.family
    if evaluator.apply == "merged" and shards_the_model(cfg.trainer):
        raise ValueError(f"eval.apply=merged (the {family.name} family is evaluated merged) under trainer=fsdp, which "
                         f"shards the weights over the ranks: {SHARDED_MERGE}")  # refused before the training, not after
    method: Method = instantiate(cfg.method)
    make_trainer = partial(instantiate, cfg.trainer, callbacks=callbacks, logger=loggers or False,
                           default_root_dir=str(run_dir))
    ctx = RunContext(bundle, family, data, evaluator, run_dir, make_trainer, ckpt_path)

    fit_start = time.time()
    edit = method.fit(ctx)
    fit_seconds = time.time() - fit_start
    sharded = is_sharded(bundle.model)
    if rank_zero_only.rank != 0 and not sharded:  # other ranks of a DDP run: one process evaluates and writes
        return {}
    edit.meta.update(method.describe() | {"model": bundle.name})
    if rank_zero_only.rank == 0:
        edit.save(run_dir / "edit.safetensors")  # before the evaluation, which may take long or fail
    # a sharded model (trainer=fsdp) gathers every rank's shards in each forward, so every rank evaluates in step
    categories = {split: data.categories(f"eval_{split}") for split in ("harmful", "harmless")}
    results, samples = evaluator.before_after(data["eval_harmful"], data["eval_harmless"], edit, categories)
    if evaluator.on_select and data["select_harmful"]:
        results |= selection_metrics(evaluator, data, edit)
    factors = edit.lora_factors(bundle.model) if edit.has_weight_form(bundle.model) else None  # a collective
    if rank_zero_only.rank != 0:
        return {}

    warnings = []
    if factors is not None:
        base_name = bundle.source.get("organism") or bundle.source.get("pretrained")
        export_peft_adapter(edit, bundle.model, run_dir / "adapter", base_name, factors)
        if cfg.export_merged and sharded:
            warnings.append("export_merged=true wrote no merged model: under trainer=fsdp no process holds the "
                            "whole model; merge the adapter (run_dir/adapter) into the base model in one process")
        elif cfg.export_merged:
            save_merged_model(edit, bundle.model, bundle.tokenizer, run_dir / "merged")
    else:
        log.warning("this edit projects module outputs (moe_scope=layer_output, or edit_at=residual): it has no "
                    "weight form, so no adapter or merged model is exported; edit.safetensors applies it as hooks")

    if results["refusal_rate_before"] == 0:
        warnings.append("the model refused none of the eval harmful prompts before the edit: this eval set cannot "
                        "show a reduction (check the model or data.eval_harmful)")
    metrics = results | method.describe() | ctx.report | {
        "model": bundle.name, "family": family.name, "kl_at": family.kl_at, "eval_apply": evaluator.apply,
        "tuned_settings": tuned_overlay(),
        "seed": cfg.seed,
        "model_sharded": sharded, "fit_seconds": round(fit_seconds, 1), "wall_time_s": round(time.time() - start, 1),
        "run_dir": str(run_dir),
        "warnings": warnings,
        "model_source": bundle.source, "data": data.fingerprint(), "versions": versions(), **code,
        "resumed_from": ckpt_path, "config": resolved,
    }
    write_json(run_dir / "metrics.json", metrics)
    write_jsonl(run_dir / "samples.jsonl", samples)
    write_model_cards(run_dir, metrics, method.describe(), run_command())
    for logger in loggers:
        logger.log_metrics({f"eval/{k}": float(metrics[k]) for k in REPORT_KEYS})
        log_samples_table(logger, samples)
        logger.save()
    print_summary(metrics, warnings)
    return metrics
