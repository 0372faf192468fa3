"""The learned subspace: a LightningModule whose only parameters are the projection bases (and strengths)."""

from __future__ import annotations

from typing import Sequence

import lightning as L
import torch
from torch import Tensor, nn

from subspace.interventions.edit import ProjectionEdit
from subspace.interventions.projection import ProjectionHooks, orthonormalize
from subspace.families.base import Family
from subspace.objectives.losses import kl_divergence, refusal_loss


class LearnedSubspace(nn.Module):
    """Orthonormal bases U_g ∈ R^{d×k} (QR of free parameters, float32) shared by groups of writer sites.

    `groups[s]` says which basis site `s` uses: all zeros for one global subspace, the layer index
    for one subspace per layer. Strengths λ_s = sigmoid(logit_s) when learned, else fixed at 1.
    """

    def __init__(self, init: Tensor, groups: Sequence[int], learn_strength: bool = False, strength_init: float = 0.9):
        super().__init__()
        self.raw = nn.Parameter(init.detach().float().clone())  # [G, d, k]
        self.register_buffer("groups", torch.as_tensor(list(groups), dtype=torch.long), persistent=False)
        logit = torch.logit(torch.tensor(strength_init)) if learn_strength else torch.tensor(torch.inf)
        self.strength_logits = nn.Parameter(torch.full((len(groups),), float(logit)), requires_grad=learn_strength)

    def forward(self) -> tuple[Tensor, Tensor]:
        """(bases [S, d, k], strengths [S]) for every site."""
        return orthonormalize(self.raw)[self.groups], torch.sigmoid(self.strength_logits)


class SubspaceModule(L.LightningModule):
    """Minimise `refusal(harmful) + λ·KL(P_original ‖ P_edited)(harmless)` over the subspace only.

    The base model is frozen and held outside the module's parameter registry, so checkpoints
    and optimiser state contain only the subspace. The original harmless distributions are
    computed once (`on_fit_start`) and indexed by prompt. Fit inside `with module.hooks:` so the
    projection hooks are removed however training ends.
    """

    def __init__(self, family: Family, sites: Sequence[str], subspace: LearnedSubspace, refusal_token_ids: Tensor,
                 harmless_prompt_batches: Sequence[dict[str, Tensor]] = (), kl_weight: float = 1.0, lr: float = 1e-2,
                 strength_lr: float = 5e-2, meta: dict | None = None):
        super().__init__()
        if kl_weight < 0:
            raise ValueError(f"objective.kl_weight={kl_weight} must be ≥ 0")
        self._frozen = (family,)  # a tuple is not registered: the model gets no gradients and stays out of checkpoints
        self.sites = list(sites)
        self.subspace = subspace
        self.register_buffer("refusal_token_ids", torch.as_tensor(refusal_token_ids, dtype=torch.long))
        self.kl_weight, self.lr, self.strength_lr, self.meta = kl_weight, lr, strength_lr, meta or {}
        self._reference_batches = list(harmless_prompt_batches)
        self.reference: Tensor | None = None
        self.hooks = ProjectionHooks([family.model.get_submodule(s) for s in self.sites])

    @property
    def family(self) -> Family:
        return self._frozen[0]

    @torch.no_grad()
    def on_fit_start(self) -> None:
        if self.reference is None:
            self.reference = torch.cat([self.family.response_logprobs(b) for b in self._reference_batches])

    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        bases, strengths = self.subspace()  # one QR per step, shared by every hook
        self.hooks.set(bases, strengths)
        harmful = self.family.response_logprobs(batch["harmful"])
        harmless_batch = dict(batch["harmless"])
        index = harmless_batch.pop("index")
        harmless = self.family.response_logprobs(harmless_batch)
        refusal = refusal_loss(harmful[:, 0], self.refusal_token_ids)
        kl = kl_divergence(self.reference[index.cpu()].to(harmless.device), harmless)
        loss = refusal + self.kl_weight * kl
        self.log_dict({"train/refusal": refusal, "train/kl": kl, "train/loss": loss,
                       "train/strength": strengths.detach().mean()}, prog_bar=True)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {self.global_step}: refusal={refusal.item()}, kl={kl.item()}")
        return loss

    def configure_optimizers(self):
        groups = [{"params": [self.subspace.raw], "lr": self.lr}]
        if self.subspace.strength_logits.requires_grad:
            groups.append({"params": [self.subspace.strength_logits], "lr": self.strength_lr})
        return torch.optim.Adam(groups)

    def to_edit(self) -> ProjectionEdit:
        with torch.no_grad():
            bases, strengths = self.subspace()
        return ProjectionEdit(self.sites, bases, strengths, dict(self.meta))
