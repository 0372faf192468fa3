"""torchmetrics `Metric`s so the numbers accumulate over batches the standard way.

Evaluation runs in one process (rank 0, after a multi-process fit), so `compute` does not sync across processes
by default: a sync would wait for ranks that never evaluate. Pass `sync_on_compute=True` to share one metric
across ranks that all update it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from subspace.evaluation.judges import VERDICTS
from subspace.objectives.losses import kl_divergence


class RefusalRate(Metric):
    """Share of responses the judge calls refusals."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**{"sync_on_compute": False} | kwargs)
        self.add_state("refused", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, flags: Tensor) -> None:
        flags = torch.as_tensor(flags, dtype=torch.bool)
        self.refused += flags.sum()
        self.total += flags.numel()

    def compute(self) -> Tensor:
        return self.refused.double() / self.total.clamp(min=1)


class VerdictRates(Metric):
    """Share of responses given each verdict, in the order of `judges.VERDICTS` (refusal, answer, broken)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**{"sync_on_compute": False} | kwargs)
        self.add_state("counts", default=torch.zeros(len(VERDICTS), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, verdicts) -> None:
        unknown = sorted(set(verdicts) - set(VERDICTS))
        if unknown:
            raise ValueError(f"verdicts {unknown} are not among {VERDICTS}")
        self.counts += torch.tensor([sum(v == k for v in verdicts) for k in VERDICTS])

    def compute(self) -> Tensor:
        return self.counts.double() / self.counts.sum().clamp(min=1)


class ResponseKL(Metric):
    """Mean KL(P_original ‖ P_edited) at the response positions: the first one (causal) or the first canvas ones (diffusion)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**{"sync_on_compute": False} | kwargs)
        self.add_state("kl_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, reference_logprobs: Tensor, logprobs: Tensor) -> None:
        self.kl_sum += kl_divergence(reference_logprobs, logprobs).double() * len(logprobs)
        self.total += len(logprobs)

    def compute(self) -> Tensor:
        return self.kl_sum / self.total.clamp(min=1)
