"""At the end of a subspace fit: the geometry of refusal before/after the trained subspace, as files and W&B images."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import lightning as L

from subspace.analysis import ProbeSettings, measure
from subspace.analysis.training_log import Curves
from subspace.interventions.projection import ProjectionHooks

log = logging.getLogger(__name__)
NEEDS_MODULE = ("family", "hooks", "to_edit")  # a SubspaceModule
NEEDS_DATAMODULE = ("tokenizer", "harmful", "harmless", "system_prompt")  # a PairedPromptDataModule


@contextmanager
def paused(hooks: ProjectionHooks) -> Iterator[None]:
    """The training hooks stay registered until `fit` returns; a hook with no bases passes outputs through,
    so clearing them shows the unedited model (and keeps them from stacking on `edit.applied`)."""
    saved = hooks.bases, hooks.strengths
    hooks.bases, hooks.strengths = None, None
    try:
        yield
    finally:
        hooks.bases, hooks.strengths = saved


class GeometryPlots(L.Callback):
    """Writes `scripts/analyze.py`'s table and figures for the trained subspace into `dirpath` when fitting ends.

    The prompts are the first `n_prompts` of each class the subspace was trained on (the datamodule's), the
    training curves are the `train/*` metrics seen during the fit. Each PNG is logged as an image to every
    logger that has `log_image` (W&B); a logger that fails is reported in the log, never raised. Runs on the
    global-zero process only. A failure here is logged, not raised: the fit is over, and its edit must
    still be saved by the caller.
    """

    def __init__(self, dirpath: str | None = None, n_prompts: int = 128, batch_size: int = 16,
                 reference_layer: int | None = None, probe: dict[str, Any] | None = None, log_images: bool = True):
        if n_prompts < 2:
            raise ValueError(f"n_prompts={n_prompts} must be ≥ 2 (the probe fits on one part and tests on another)")
        self.dirpath, self.n_prompts, self.batch_size = dirpath, n_prompts, batch_size
        self.reference_layer, self.probe, self.log_images = reference_layer, ProbeSettings(**(probe or {})), log_images
        self.curves: Curves = {}
        self.paths: dict[str, Path] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = max(trainer.global_step - 1, 0)  # the optimiser step that produced these metrics, as CSVLogger counts
        for name, value in trainer.callback_metrics.items():
            if name.startswith("train/"):
                steps, values = self.curves.setdefault(name, ([], []))
                steps.append(step)
                values.append(float(value))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        missing = [f"module.{a}" for a in NEEDS_MODULE if not hasattr(pl_module, a)]
        missing += [f"datamodule.{a}" for a in NEEDS_DATAMODULE if not hasattr(trainer.datamodule, a)]
        if missing:
            log.warning("geometry plots skipped: this fit has no %s (they need a SubspaceModule and its "
                        "PairedPromptDataModule)", ", ".join(missing))
            return
        try:
            self.paths = self.write(trainer, pl_module)
        except Exception:  # noqa: BLE001 - the trained subspace matters more than its plots
            log.exception("geometry plots failed; the run goes on without them")
            return
        if self.log_images:
            self.log_to(trainer.loggers, trainer.global_step)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Path]:
        from subspace.analysis.report import write_report  # matplotlib only when the plots are drawn

        data, edit = trainer.datamodule, pl_module.to_edit()
        out = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "geometry"
        with paused(pl_module.hooks):
            geometry = measure(pl_module.family, data.tokenizer, data.harmful[: self.n_prompts],
                               data.harmless[: self.n_prompts], edit, self.batch_size, data.system_prompt,
                               self.reference_layer, self.probe)
        geometry.meta |= {"split": "train", "step": trainer.global_step}
        paths = write_report(geometry, out, self.curves, "trained subspace")
        log.info("geometry plots written to %s", out)
        return paths

    def log_to(self, loggers: list, step: int) -> None:
        images = {name: path for name, path in self.paths.items() if path.suffix == ".png"}
        for logger in loggers:
            if not callable(getattr(logger, "log_image", None)):
                continue
            for name, path in images.items():
                try:
                    logger.log_image(key=f"geometry/{name}", images=[str(path)], step=step)
                except Exception as err:  # noqa: BLE001 - an image upload must never fail a run
                    log.warning("could not log %s to %s: %s", path.name, type(logger).__name__, err)
