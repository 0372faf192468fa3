"""The learned subspace method: initialise from difference of means, train with Lightning."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from subspace.data.datamodule import PairedPromptDataModule
from subspace.interventions.edit import ProjectionEdit
from subspace.methods.base import RunContext
from subspace.methods.directions import class_means
from subspace.methods.moe_scope import calibration, check_moe_scope, scoped_sites
from subspace.objectives.refusal_kl import RefusalKLObjective
from subspace.training.checkpointing import checkpointed_layers
from subspace.training.subspace_module import LearnedSubspace, SubspaceModule

log = logging.getLogger(__name__)
SCOPES = ("global", "per_layer")


@dataclass
class Subspace:
    """Learn U (rank k) against refusal + λ·KL; `scope` is one global U or one U per edited layer.

    `moe_scope` says what of a MoE layer is edited (see `subspace.methods.moe_scope`); every site of a layer,
    expert slices included, shares the layer's U.
    """

    objective: RefusalKLObjective
    rank: int = 4
    scope: str = "per_layer"
    layers: Sequence[int] | None = None
    min_depth: float = 0.0  # with layers=None: edit layers from this fraction of the depth to the last
    learn_strength: bool = False
    strength_init: float = 0.9
    strength_lr: float = 5e-2
    lr: float = 1e-2
    batch_size: int = 8
    max_length: int | None = 256
    moe_scope: str = "all_experts"
    gradient_checkpointing: bool = False  # recompute each layer in backward: less activation memory, ~1 more forward
    name: str = "subspace"

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"method.scope={self.scope!r} is not one of {SCOPES}")
        if not 0 < self.strength_init < 1:
            raise ValueError(f"method.strength_init={self.strength_init} must be in (0, 1) (λ = sigmoid(logit))")
        if self.rank <= 0:
            raise ValueError(f"method.rank={self.rank} must be a positive integer")
        if not 0 <= self.min_depth < 1:
            raise ValueError(f"method.min_depth={self.min_depth} must be in [0, 1) (a fraction of the model's depth)")
        check_moe_scope(self.moe_scope)

    def describe(self) -> dict[str, Any]:
        objective = self.objective
        refusal = (f"prefix ({objective.prefix_tokens} tokens, ≤ {objective.max_prefixes})"
                   if objective.refusal == "prefix" else objective.refusal)
        return {"method": self.name, "rank": self.rank, "scope": self.scope, "kl_weight": objective.kl_weight,
                "kl_top_k": objective.kl_top_k, "refusal_term": refusal,
                "lr": self.lr, "layers": list(self.layers) if self.layers is not None else f"from depth {self.min_depth}",
                "learn_strength": self.learn_strength, "strength_init": self.strength_init, "moe_scope": self.moe_scope}

    def edited_layers(self, num_layers: int) -> Sequence[int]:
        """`layers` if given, else every layer from `min_depth` of the depth on (early layers hold no refusal
        direction: the class means there have cosine ≈ 1, and editing them only adds KL)."""
        return self.layers if self.layers is not None else range(math.ceil(self.min_depth * num_layers), num_layers)

    def initial_bases(self, differences: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """Columns of each basis: its own layer's r̂ (per_layer) or the strongest layer's (global), then the
        next-strongest layers' directions; zero differences (e.g. a constant last token) are skipped and
        missing columns are random, so the span of difference-of-means is the starting point."""
        norms = differences.norm(dim=-1)
        usable = [l for l in torch.argsort(norms, descending=True).tolist() if norms[l] > 1e-6 * norms.max()]
        if not usable:  # no layer separates the classes at all (a tiny random model): start from random bases
            log.warning("the class means are equal at every layer: the subspace starts from random bases")
            usable = list(range(len(norms)))
        heads = [l if l in usable else usable[0] for l in layers] if self.scope == "per_layer" else [usable[0]]
        generator = torch.Generator().manual_seed(0)
        bases = []
        for head in heads:
            cols = ([head] + [l for l in usable if l != head])[: self.rank]
            basis = torch.randn(differences.shape[-1], self.rank, generator=generator) * 1e-3
            basis[:, : len(cols)] += torch.nn.functional.normalize(differences[cols], dim=-1).T
            bases.append(basis)
        return torch.stack(bases)

    def fit(self, ctx: RunContext) -> ProjectionEdit:
        fam, tok = ctx.family, ctx.bundle.tokenizer
        if self.rank >= fam.hidden_size:
            raise ValueError(f"method.rank={self.rank} must be < hidden size {fam.hidden_size}")
        with calibration(fam, self.moe_scope) as fired:
            means = class_means(fam, tok, ctx.data["train_harmful"], ctx.data["train_harmless"],
                                system_prompt=ctx.evaluator.system_prompt)
        ctx.report["class_mean_cosine"] = means.cosine.tolist()
        scoped = scoped_sites(fam, self.edited_layers(fam.num_layers), self.moe_scope, fired)
        sites = scoped.sites
        layers = sorted({s.layer for s in sites})
        groups = [layers.index(s.layer) if self.scope == "per_layer" else 0 for s in sites]
        subspace = LearnedSubspace(self.initial_bases(means.difference, layers), groups, self.learn_strength,
                                   self.strength_init)
        refusal_ids = self.objective.refusal_token_ids(ctx.evaluator, ctx.data["train_harmful"])
        ctx.report["refusal_token_ids"] = refusal_ids.tolist()
        datamodule = PairedPromptDataModule(tok, fam, ctx.data["train_harmful"], ctx.data["train_harmless"],
                                            self.batch_size, ctx.evaluator.system_prompt, self.max_length)
        module = SubspaceModule(fam, scoped.names, subspace, refusal_ids, datamodule.harmless_batches(),
                                self.objective.kl_weight, self.lr, self.strength_lr, meta=self.describe(),
                                expert_masks=scoped.expert_masks, kl_top_k=self.objective.kl_top_k,
                                refusal=self.objective.refusal, checkpointed=self.gradient_checkpointing)
        if ctx.make_trainer is None:
            raise ValueError("method=subspace needs a Lightning trainer (cfg.trainer)")
        trainer = ctx.make_trainer()
        with module.hooks, checkpointed_layers(fam.layers, self.gradient_checkpointing):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ctx.ckpt_path)
        ctx.report["steps"] = trainer.global_step
        ctx.report["expert_edit_paths"] = {site.name: path for site, path in zip(module.hooks.sites, module.hooks.paths)
                                           if site.stacked}  # "output": projected at the experts' output (lean)
        return module.to_edit()
