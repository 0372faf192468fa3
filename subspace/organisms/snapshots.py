"""Copies of an organism taken during its fine-tune, so quality can be read against training steps."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class Snapshots(L.Callback):
    """Saves the model (and tokenizer) to `folder/stepN` every `every` optimiser steps; the finished organism is the
    last step, saved by the build itself. A snapshot is written inside the build's temporary folder, so it exists only
    once the whole build succeeds."""

    def __init__(self, folder: Path, every: int, tokenizer: PreTrainedTokenizerBase):
        if every <= 0:
            raise ValueError(f"snapshot_every={every}: must be a positive number of steps (0 or null: no snapshots)")
        self.folder, self.every, self.tokenizer = Path(folder), every, tokenizer

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if step % self.every or step >= trainer.max_steps:
            return
        target = self.folder / f"step{step}"
        module.model.save_pretrained(target)
        self.tokenizer.save_pretrained(target)
        log.info("snapshot at step %d -> %s", step, target)


def snapshot_steps(folder: Path) -> dict[int, Path]:
    """{step: folder} of an organism's snapshots, in step order."""
    found = {int(p.name[4:]): p for p in Path(folder).glob("step*") if p.name[4:].isdigit()}
    return dict(sorted(found.items()))


def load_snapshot(model: PreTrainedModel, folder: Path) -> None:
    """Put the weights saved in `folder` (a snapshot, or the organism itself) into `model`, in place."""
    saved = type(model).from_pretrained(folder, dtype=next(model.parameters()).dtype)
    model.load_state_dict(saved.state_dict())
