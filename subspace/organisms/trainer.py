"""The one Lightning trainer every organism fine-tune uses."""

from __future__ import annotations

from typing import Sequence

import lightning as L

from subspace.training.progress import LogProgress


def organism_trainer(max_steps: int, name: str, accelerator: str = "cpu", precision: str | None = None,
                     callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    """The Lightning trainer every organism fine-tune uses: deterministic, no logger or checkpoints (the organism is
    saved whole when it is done), progress logged. `accelerator` is each organism config's `accelerator` (cpu, which
    the cached organisms were built on; gpu builds an organism of its own key, see `organism_key`); `precision` a
    Lightning precision (None: 32-true, what every organism before the LLaDA organism v2 was built in)."""
    return L.Trainer(max_steps=max_steps, accelerator=accelerator, precision=precision or "32-true",
                     max_epochs=-1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                     deterministic=True, callbacks=[LogProgress(name), *callbacks])
