"""Logs how far the learned subspace has moved from its difference-of-means start."""

from __future__ import annotations

import lightning as L
import torch

from subspace.interventions.projection import orthonormalize


class SubspaceMonitor(L.Callback):
    """`subspace/overlap_with_init` = mean ‖U₀ᵀU‖²_F / k over bases: 1 when unchanged, → 0 when orthogonal."""

    def __init__(self, every_n_steps: int = 5):
        self.every_n_steps = every_n_steps
        self.initial: torch.Tensor | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.initial is None:  # a resumed fit keeps the start it was checkpointed with
            self.initial = orthonormalize(pl_module.subspace.raw.detach()).clone()

    def state_dict(self) -> dict:
        return {"initial": self.initial}

    def load_state_dict(self, state_dict: dict) -> None:
        self.initial = state_dict["initial"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.initial is None or trainer.global_step % self.every_n_steps:
            return
        current = orthonormalize(pl_module.subspace.raw.detach())
        overlap = (self.initial.transpose(-1, -2) @ current).pow(2).sum((-1, -2)) / current.shape[-1]
        pl_module.log("subspace/overlap_with_init", overlap.mean())
