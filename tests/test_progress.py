"""Organism fine-tunes log their progress as lines, so a log file shows how far an hour-long build is."""

from __future__ import annotations

import logging

import lightning as L
import torch

from subspace.organisms.trainer import organism_trainer


class Quadratic(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.x = torch.nn.Parameter(torch.tensor(3.0))

    def training_step(self, batch, batch_idx):
        loss = (self.x - batch.mean()) ** 2
        self.log("loss", loss)
        return loss

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(40, 1), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_organism_trainer_logs_a_line_every_five_percent(caplog):
    with caplog.at_level(logging.INFO, logger="subspace.training.progress"):
        organism_trainer(40, "toy organism").fit(Quadratic())
    lines = [r.getMessage() for r in caplog.records if r.name == "subspace.training.progress"]
    assert lines[0].startswith("toy organism: step 2/40 (5%)") and "loss" in lines[0]
    assert lines[-1].startswith("toy organism: step 40/40 (100%)") and len(lines) == 20
