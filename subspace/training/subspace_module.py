"""The learned subspace: a LightningModule whose only parameters are the projection bases (and strengths)."""

from __future__ import annotations

import random
from typing import Any, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard

from subspace.interventions.edit import ProjectionEdit
from subspace.interventions.projection import ProjectionHooks, orthonormalize
from subspace.families.base import Family
from subspace.objectives.losses import prefix_refusal_loss, refusal_loss
from subspace.objectives.reference import ReferenceDistributions, check_top_k
from subspace.training.sharding import shard_frozen_model
from subspace.utils.sharded import full, is_sharded


def rng_states() -> dict[str, Any]:
    """The global generators a checkpoint carries, so resumed steps draw what the uninterrupted run would have
    (the objective draws none today; dropout or a sampling callback would). Lightning saves none of them."""
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def nonfinite(values: dict[str, Tensor]) -> list[str]:
    """Names of the tensors that hold a NaN or an infinity (a sharded one is gathered: every rank must call this)."""
    return [name for name, v in values.items() if v is not None and not torch.isfinite(full(v)).all()]


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
    and optimiser state contain only the subspace (under trainer=fsdp `configure_model` shards it all the same).
    The original harmless distributions are computed once (`on_fit_start`) and indexed by prompt: over the full vocabulary, or with `kl_top_k`
    only each position's top-k tokens and the pooled rest (`ReferenceDistributions`). Fit inside
    `with module.hooks:` so the projection hooks are removed however training ends.

    Resuming is exact: a checkpoint also holds the global RNG states and a digest of the original
    distributions, and a resumed fit stops if the original distributions or the refusal tokens differ
    from the ones the checkpoint was trained against (the model or the prompts changed). A non-finite
    loss or gradient stops the fit before the optimiser step, so no checkpoint holds its result.
    """

    def __init__(self, family: Family, sites: Sequence[str], subspace: LearnedSubspace, refusal_token_ids: Tensor,
                 harmless_prompt_batches: Sequence[dict[str, Tensor]] = (), kl_weight: float = 1.0, lr: float = 1e-2,
                 strength_lr: float = 5e-2, meta: dict | None = None, expert_masks: dict[str, Tensor] | None = None,
                 kl_top_k: int | None = None, refusal: str = "first_token", checkpointed: bool = False):
        super().__init__()
        if kl_weight < 0:
            raise ValueError(f"objective.kl_weight={kl_weight} must be ≥ 0")
        check_top_k(kl_top_k)
        self._frozen = (family,)  # a tuple is not registered: the model gets no gradients and stays out of checkpoints
        self.sites = list(sites)
        self.subspace = subspace
        self.register_buffer("refusal_token_ids", torch.as_tensor(refusal_token_ids, dtype=torch.long))
        self._probed_refusal_ids = self.refusal_token_ids.clone()  # what a resumed checkpoint must match
        self.kl_weight, self.lr, self.strength_lr, self.meta = kl_weight, lr, strength_lr, meta or {}
        self.kl_top_k = kl_top_k
        self.refusal = refusal  # "prefix": refusal_token_ids are [R, K] refusal openings, scored teacher-forced
        self.checkpointed = checkpointed  # the model's layers recompute in backward: no shared prompt cache
        self._reference_batches = list(harmless_prompt_batches)
        self.reference: ReferenceDistributions | None = None
        self._reference_digest: str | None = None
        self._checkpoint_reference_digest: str | None = None  # set when resuming
        self._term_logprobs: dict[str, Tensor] = {}  # this step's log-probs of each term, their gradients kept
        self._terms: dict[str, Tensor] = {}  # this step's loss terms, for the error messages
        self.expert_masks = dict(expert_masks or {})  # stacked-experts site → experts it edits (absent: all)
        self.hooks = ProjectionHooks.for_sites(family.model, self.sites, self.expert_masks)

    @property
    def family(self) -> Family:
        return self._frozen[0]

    def configure_model(self) -> None:
        """trainer=fsdp (Lightning's ModelParallelStrategy sets a device mesh): shard the frozen model and the
        subspace over the ranks (subspace/training/sharding.py). Other strategies set none: nothing to do."""
        if self.device_mesh is None or is_sharded(self.family.model):
            return
        if swapped := [site.name for site, path in zip(self.hooks.sites, self.hooks.paths) if path == "weight"]:
            raise NotImplementedError(f"trainer=fsdp cannot shard fused experts whose weights the edit swaps in "
                                      f"({', '.join(swapped[:3])}, ...): use trainer=ddp for this model")
        shard_frozen_model(self.family.model, self.family.layers, self.device_mesh)
        fully_shard(self.subspace, mesh=self.device_mesh)  # FSDP2 then averages its gradients over every rank

    @torch.no_grad()
    def on_fit_start(self) -> None:
        if self.reference is None:
            logprobs = (self.family.response_logprobs(b) for b in self._reference_batches)
            self.reference = ReferenceDistributions.build(logprobs, self.kl_top_k)
            self._reference_digest = self.reference.digest()
        expected = self._checkpoint_reference_digest
        if expected is not None and expected != self._reference_digest:
            raise ValueError(f"the checkpoint was trained against original harmless distributions with digest "
                             f"{expected}, this run computed {self._reference_digest}: the model, the harmless "
                             "training prompts or objective.kl_top_k changed since, so the run cannot be resumed "
                             "from it")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = rng_states()
        checkpoint["reference_digest"] = self._reference_digest
        checkpoint["refusal_token_ids"] = self.refusal_token_ids.cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # outside "state_dict", which trainer=fsdp loads into the module (buffer included) before this hook runs
        saved = checkpoint.get("refusal_token_ids", checkpoint.get("state_dict", {}).get("refusal_token_ids"))
        if not torch.equal(saved.cpu(), self._probed_refusal_ids):
            raise ValueError(f"the checkpoint was trained against refusal tokens {saved.tolist()}, this run probed "
                             f"{self._probed_refusal_ids.tolist()}: the model or the harmful training prompts changed "
                             "since, so the run cannot be resumed from it")
        self._checkpoint_reference_digest = checkpoint.get("reference_digest")
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])

    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        bases, strengths = self.subspace()  # one QR per step, shared by every hook
        self.hooks.set(bases, strengths)
        harmful = self.harmful_logprobs(batch["harmful"])
        harmless_batch = dict(batch["harmless"])
        index = harmless_batch.pop("index")
        harmless = self.family.response_logprobs(harmless_batch)
        refusal, kl = self.terms(harmful, harmless, index)
        loss = refusal + self.kl_weight * kl
        self.log_dict({"train/refusal": refusal, "train/kl": kl, "train/loss": loss,
                       "train/strength": strengths.detach().mean()}, prog_bar=True)
        self._terms = {"refusal": refusal.detach(), "kl": kl.detach()}
        if not torch.isfinite(loss):  # one check per step; a non-finite term makes the sum non-finite (0·inf too)
            bad = nonfinite(self._terms)
            what = f"the {' and '.join(bad)} term" if bad else "the sum of finite terms overflowed"
            raise FloatingPointError(f"non-finite loss at step {self.global_step}: {what}; {self._describe_terms()}")
        self._term_logprobs = {name: lp for name, lp in (("refusal", harmful), ("kl", harmless)) if lp.requires_grad}
        for logprobs in self._term_logprobs.values():
            logprobs.retain_grad()  # to tell, if a gradient turns non-finite, which term's it was
        return loss

    def harmful_logprobs(self, batch: dict[str, Tensor]) -> Tensor:
        """What the refusal term reads: log P of each refusal prefix [batch, R] (refusal="prefix"), else the
        log-probabilities at the response positions."""
        if self.refusal == "prefix":
            return self.family.prefix_logprobs(batch, self.refusal_token_ids, share_prompt=not self.checkpointed)
        return self.family.response_logprobs(batch)

    def terms(self, harmful: Tensor, harmless: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """(refusal, KL) from `harmful_logprobs` and the harmless response log-probabilities; `index` picks the
        cached originals."""
        kl = self.reference[index.cpu()].to(harmless.device).kl(harmless)
        refusal = (prefix_refusal_loss(harmful) if self.refusal == "prefix"
                   else refusal_loss(harmful, self.refusal_token_ids))
        return refusal, kl

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop before a non-finite gradient reaches the subspace (and so any checkpoint)."""
        grads = {name: p.grad for name, p in self.named_parameters() if p.requires_grad}
        if not (bad := nonfinite(grads)):
            return
        terms = nonfinite({name: lp.grad for name, lp in self._term_logprobs.items()})
        origin = (f"it is already non-finite at the log-probabilities of the {' and '.join(terms)} term" if terms else
                  "the gradients at both terms' log-probabilities are finite, so it arose in the backward pass "
                  "after them (through the model or the subspace)")
        raise FloatingPointError(f"non-finite gradient at step {self.global_step} in {', '.join(bad)}: {origin}; "
                                 f"{self._describe_terms()}")

    def _describe_terms(self) -> str:
        terms = ", ".join(f"{name}={value.item():.6g}" for name, value in self._terms.items())
        return f"terms at this step: {terms}; no checkpoint was written for this step"

    def configure_optimizers(self):
        groups = [{"params": [self.subspace.raw], "lr": self.lr}]
        if self.subspace.strength_logits.requires_grad:
            groups.append({"params": [self.subspace.strength_logits], "lr": self.strength_lr})
        return torch.optim.Adam(groups)

    def to_edit(self) -> ProjectionEdit:
        with torch.no_grad():
            bases, strengths = self.subspace()
        return ProjectionEdit(self.sites, bases, strengths, dict(self.meta), self.expert_masks)
