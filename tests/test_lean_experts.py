"""Lean expert edits: with every expert edited, a fused experts module that sums its experts linearly is projected at
its output instead of running projected weights — the same edit (logits, gradients), without a projected copy of
every expert's weights kept for backward. On the tiny random MoE models of test_moe, in float32."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import Tensor, nn
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

from subspace.families import CausalFamily
from subspace.interventions import ProjectionHooks, orthonormalize
from subspace.families.moe import sums_expert_outputs
from subspace.interventions.sites import resolve_sites
from subspace.methods.moe_scope import scoped_sites
from subspace.models.tiny import tiny_tokenizer
from tests.conftest import EXPERTS, HIDDEN, KINDS, moe_layers, tiny_moe, token_ids

RANK = 3


def random_edit(count: int, seed: int = 3) -> tuple[Tensor, Tensor]:
    """Raw (un-orthonormalised) bases [S, d, k] and strengths [S] in (0.5, 1.5), as a trainable subspace has them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, HIDDEN, RANK, generator=g), torch.rand(count, generator=g) + 0.5


def run(model: nn.Module, names: list[str], raw: Tensor, strengths: Tensor, lean: bool,
        masks: dict[str, Tensor] | None = None) -> Tensor:
    """Logits of the model edited at `names` by hooks taking the lean path or (lean=False) the weight swap."""
    with ProjectionHooks.for_sites(model, names, masks, lean_experts=lean) as hooks:
        hooks.set(orthonormalize(raw), strengths)
        return model(token_ids()).logits


def saved_bytes(model: nn.Module, forward: Callable[[], Tensor]) -> int:
    """Bytes autograd keeps for backward during `forward`, each storage once; the model's own parameters are left
    out, since they are held anyway."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        if (ptr := t.untyped_storage().data_ptr()) not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()  # alive until counted: the storages seen are distinct
    del out
    return sum(saved.values())


def writer_names(model: nn.Module) -> list[str]:
    return [s.name for s in CausalFamily(model).writer_sites()]


@pytest.mark.parametrize("kind", KINDS)
def test_lean_path_gives_the_weight_swaps_logits_and_gradients(kind):
    model = tiny_moe(kind)
    names = writer_names(model)
    raw, strengths = random_edit(len(names))
    original = model(token_ids()).logits
    logits, grads = {}, {}
    for lean in (True, False):
        raw_ = raw.clone().requires_grad_(True)
        strengths_ = strengths.clone().requires_grad_(True)
        logits[lean] = run(model, names, raw_, strengths_, lean)
        torch.log_softmax(logits[lean], -1)[..., 5:9].mean().backward()
        grads[lean] = raw_.grad, strengths_.grad
    scale = logits[False].abs().max()
    assert (logits[False] - original).abs().max() > 1e-3 * scale  # the edit does something
    assert (logits[True] - logits[False]).abs().max() <= 1e-5 * scale
    for lean_grad, swap_grad in zip(grads[True], grads[False]):
        assert swap_grad.abs().max() > 0
        assert (lean_grad - swap_grad).abs().max() <= 1e-4 * swap_grad.abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_lean_path_is_taken_for_all_experts_and_not_for_active_only(kind):
    model = tiny_moe(kind)
    family, tok = CausalFamily(model), tiny_tokenizer()
    names = writer_names(model)
    stacked = [n.endswith("experts.down_proj") for n in names]
    assert sum(stacked) == len(moe_layers(model))
    assert ProjectionHooks.for_sites(model, names).paths == ["output"] * len(names)
    assert ProjectionHooks.for_sites(model, names, lean_experts=False).paths == [
        "weight" if s else "output" for s in stacked]
    with family.recorded_routing() as fired:
        model(**family.chat_batch(tok, ["Hi"]))
    scoped = scoped_sites(family, None, "active_only", fired)
    assert scoped.expert_masks and all(not m.all() for m in scoped.expert_masks.values())
    paths = dict(zip(scoped.names, ProjectionHooks.for_sites(model, scoped.names, scoped.expert_masks).paths))
    assert all(paths[name] == "weight" for name in scoped.expert_masks)  # some experts unedited: the weight swap
    every = {name: torch.ones(EXPERTS, dtype=torch.bool) for name in scoped.expert_masks}
    assert ProjectionHooks.for_sites(model, list(every), every).paths == ["output"] * len(every)


def experts_path(experts: nn.Module) -> str:
    holder = nn.Module()
    holder.experts = experts
    return ProjectionHooks.for_sites(holder, ["experts.down_proj"]).paths[0]


def test_experts_not_known_to_sum_linearly_keep_the_weight_swap():
    model = tiny_moe("olmoe")
    experts = model.model.layers[0].mlp.experts
    assert experts_path(experts) == "output"
    assert not sums_expert_outputs(experts, "gate_up_proj")  # not the down projection
    gpt_oss = GptOssExperts(GptOssConfig(hidden_size=HIDDEN, intermediate_size=32, num_local_experts=4))
    assert gpt_oss.has_bias and experts_path(gpt_oss) == "weight"  # a real transformers class with biases
    for flag in ("has_bias", "has_post_expert_norm", "is_transposed"):
        setattr(experts, flag, True)
        assert experts_path(experts) == "weight", flag
        setattr(experts, flag, False)
    experts.down_proj_bias = nn.Parameter(torch.zeros(EXPERTS, HIDDEN))
    assert experts_path(experts) == "weight"  # a bias parameter, whatever the flags say
    del experts.down_proj_bias
    model.config._experts_implementation = "my_kernel"  # a kernel registered outside transformers: unknown sum
    assert experts_path(experts) == "weight"
    model.config._experts_implementation = "grouped_mm"
    subclass = type("RemoteExperts", (OlmoeExperts,), {"__module__": "transformers_modules.remote"})
    assert experts_path(subclass(model.config)) == "weight"  # trust_remote_code classes: their forward is unread
    site = resolve_sites(model, ["model.layers.0.mlp.experts.down_proj"])[0]
    assert site.output_equivalent and experts_path(experts) == "output"


@pytest.mark.parametrize("kind", ["qwen3_moe", "olmoe", "mixtral"])
def test_lean_path_keeps_no_projected_copy_of_the_expert_weights_for_backward(kind):
    model = tiny_moe(kind)
    names = writer_names(model)
    raw, strengths = random_edit(len(names))
    raw.requires_grad_(True)
    used = {lean: saved_bytes(model, lambda lean=lean: run(model, names, raw, strengths, lean))
            for lean in (True, False)}
    copies = sum(block.experts.down_proj.numel() * 4 for _, block in moe_layers(model))  # E·d·in·4 per edited layer
    assert used[True] < used[False] and used[False] - used[True] >= copies, (used, copies)
