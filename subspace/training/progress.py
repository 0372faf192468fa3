"""Long fits that say how far they are, in a terminal and in a log file alike."""

from __future__ import annotations

import logging

import lightning as L

log = logging.getLogger(__name__)


class LogProgress(L.Callback):
    """A log line every `every` share of `max_steps` (and at the end) with the step and the logged losses: a progress
    bar draws nothing useful into a file, and an organism's fine-tune runs for most of an hour."""

    def __init__(self, name: str, every: float = 0.05):
        self.name, self.every = name, every

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step, total = trainer.global_step, trainer.max_steps
        if total <= 0 or (step % max(1, round(total * self.every)) and step != total):
            return
        losses = "  ".join(f"{k} {float(v):.4f}" for k, v in trainer.callback_metrics.items())
        log.info("%s: step %d/%d (%.0f%%)  %s", self.name, step, total, 100 * step / total, losses)
