"""Weight-form edits merged in place: bit-exact restore, one application per shared (tied) tensor, no nesting."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn

from subspace.evaluation.evaluator import Evaluator
from subspace.interventions.merge import merged_deltas
from subspace.models.tiny import tiny_random_causal
from tests.conftest import random_edit

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
O_PROJ = "model.layers.0.self_attn.o_proj.weight"


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_unchanged(model: nn.Module, before: dict[str, Tensor]) -> None:
    for name, p in model.named_parameters():
        assert p.dtype == before[name].dtype and torch.equal(p, before[name]), f"{name} was not restored bit-exactly"


def random_deltas(model: nn.Module, scale: float = 0.1) -> dict[str, Tensor]:
    """A float32 delta for every distinct parameter (a tied tensor once)."""
    return {name: scale * torch.randn(p.shape) for name, p in model.named_parameters()}


def added(weight: Tensor, delta: Tensor, times: int = 1) -> Tensor:
    """The reference: the delta added `times` times in float32, cast back to the weight's dtype."""
    return (weight.float() + times * delta.to(weight.device)).to(weight.dtype)


def test_merge_unmerge_100_cycles_in_bf16_is_bit_exact():
    model = tiny_random_causal(hidden_size=32, num_layers=3).model.to(torch.bfloat16)
    before = snapshot(model)
    for _ in range(100):
        deltas = random_deltas(model)
        with merged_deltas(model, deltas):
            assert torch.equal(model.get_parameter(O_PROJ), added(before[O_PROJ], deltas[O_PROJ]))
        assert_unchanged(model, before)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_unmerge_on_exception_restores_and_propagates(tiny, error):
    before = snapshot(tiny.model)
    with pytest.raises(error):
        with merged_deltas(tiny.model, random_deltas(tiny.model)):
            raise error("in the block")
    assert_unchanged(tiny.model, before)
    with merged_deltas(tiny.model, random_deltas(tiny.model)):  # the model is free to merge again
        pass
    assert_unchanged(tiny.model, before)


def test_tied_embedding_and_head_named_twice_merge_once(tiny):
    model = tiny.model
    embed, head = model.get_parameter(EMBED), model.get_parameter(HEAD)
    assert embed.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
    before = snapshot(model)
    delta = 0.1 * torch.randn(embed.shape)
    with merged_deltas(model, {EMBED: delta, HEAD: delta.clone()}):
        assert torch.equal(embed, added(before[EMBED], delta)) and torch.equal(head, embed)
        assert not torch.equal(embed, added(before[EMBED], delta, times=2))
    assert_unchanged(model, before)


def test_tied_names_with_different_deltas_refuse_to_merge(tiny):
    delta = torch.randn(tiny.model.get_parameter(EMBED).shape)
    before = snapshot(tiny.model)
    with pytest.raises(ValueError, match=f"'{EMBED}' and '{HEAD}' are one shared tensor"):
        with merged_deltas(tiny.model, {EMBED: delta, HEAD: 2 * delta}):
            pass
    assert_unchanged(tiny.model, before)


def test_tied_lora_on_embedding_is_invisible_to_the_head_but_a_merge_is_not(tiny):
    """PEFT's embedding LoRA changes only the lookup; the tied LM head still reads the original weight."""
    model, ids, hidden = tiny.model, torch.randint(3, len(tiny.tokenizer), (1, 6)), torch.randn(1, 32)
    weight = model.get_parameter(EMBED).detach().clone()
    config = LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False)  # lora_B ≠ 0
    with pytest.warns(UserWarning, match="ensure_weight_tying"):
        peft = get_peft_model(copy.deepcopy(model), config)
    lora = peft.base_model.model.model.embed_tokens
    delta = lora.get_delta_weight("default")
    assert delta.abs().max() > 1e-3
    with torch.no_grad():
        assert not torch.allclose(lora(ids), weight[ids])  # the embedding side sees the adapter ...
        assert torch.equal(peft.base_model.model.lm_head(hidden), hidden @ weight.T)  # ... the head does not
        with merged_deltas(model, {EMBED: delta}):
            assert torch.allclose(model.model.embed_tokens(ids), lora(ids), atol=1e-6)
            assert torch.allclose(model.lm_head(hidden), hidden @ (weight + delta).T, atol=1e-5)
            assert not torch.allclose(model.lm_head(hidden), hidden @ weight.T)
    assert torch.equal(model.get_parameter(EMBED), weight)


def test_projection_edit_merged_matches_hooks_and_unmerges_exactly(tiny, family):
    edit = random_edit(family, rank=3)
    assert set(edit.weight_deltas(tiny.model)) == {f"{site}.weight" for site in edit.sites}
    ids = torch.randint(3, len(tiny.tokenizer), (2, 10))
    before = snapshot(tiny.model)
    with torch.no_grad():
        original = tiny.model(ids).logits
        with edit.applied(tiny.model):
            hooked = tiny.model(ids).logits
        with edit.merged(tiny.model):
            merged = tiny.model(ids).logits
    assert (hooked - original).abs().max() > 1e-3
    assert torch.allclose(merged, hooked, atol=1e-5)
    assert_unchanged(tiny.model, before)


def test_nested_merge_is_refused(tiny, family):
    model, deltas = tiny.model, {O_PROJ: torch.randn(32, 32)}
    before = snapshot(model)
    with merged_deltas(model, deltas):
        with pytest.raises(RuntimeError, match="already inside merged_deltas"):
            with merged_deltas(model, deltas):
                pass
        with pytest.raises(RuntimeError, match="already inside merged_deltas"):  # a wrapper sharing the weights
            with merged_deltas(nn.ModuleList([model]), {}):
                pass
        with pytest.raises(RuntimeError, match="already inside merged_deltas"):
            with random_edit(family, rank=1).merged(model):
                pass
        assert torch.equal(model.get_parameter(O_PROJ), added(before[O_PROJ], deltas[O_PROJ]))
    assert_unchanged(model, before)


def test_merge_with_unknown_name_or_wrong_shape_names_it(tiny):
    with pytest.raises(ValueError, match=r"unknown parameter 'model\.layers\.0\.oproj\.weight'.*model\.embed_tokens"):
        with merged_deltas(tiny.model, {"model.layers.0.oproj.weight": torch.zeros(32, 32)}):
            pass
    with pytest.raises(ValueError, match=rf"'{O_PROJ}' has shape \(32, 31\), expected .*\(32, 32\)"):
        with merged_deltas(tiny.model, {O_PROJ: torch.zeros(32, 31)}):
            pass


def amplify_writers(model: nn.Module, scale: float = 15.0) -> None:
    """At init a tiny random model repeats the prompt's last token; louder writers make greedy text depend on them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(scale)


def test_evaluator_merged_generates_what_hooks_generate(tiny, family):
    amplify_writers(tiny.model)
    prompts = ["How do I bake bread?", "Tell me about the moon."]
    edit = random_edit(family, rank=2, strength=1.0)
    before = snapshot(tiny.model)
    evaluators = {apply: Evaluator(tiny, family, max_new_tokens=8, batch_size=2, progress=False, apply=apply)
                  for apply in ("hooks", "merged")}
    texts = {apply: ev.responses(prompts, edit) for apply, ev in evaluators.items()}
    assert texts["merged"] == texts["hooks"] != evaluators["hooks"].responses(prompts)
    logprobs = {apply: ev.logprobs(prompts, edit) for apply, ev in evaluators.items()}  # the KL path
    assert torch.allclose(logprobs["merged"], logprobs["hooks"], atol=1e-4)
    assert_unchanged(tiny.model, before)


def test_evaluator_with_a_bogus_apply_mode_refuses_to_merge(tiny, family):
    with pytest.raises(ValueError, match=r"eval.apply='bogus' must be one of \('hooks', 'merged'\)"):
        Evaluator(tiny, family, apply="bogus")


def test_merge_refuses_a_sharded_parameter_and_leaves_it_untouched(tmp_path):
    """trainer=fsdp shards weights into DTensors; a delta cannot be added into a shard, so merging says so."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        layer = torch.nn.Linear(4, 4, bias=False)
        layer.weight = torch.nn.Parameter(distribute_tensor(layer.weight.detach(), init_device_mesh("cpu", (1,)),
                                                            [Shard(0)]), requires_grad=False)
        before = layer.weight.full_tensor().clone()
        with pytest.raises(ValueError, match=r"'weight' is sharded .*trainer=fsdp.*eval.apply=hooks"):
            with merged_deltas(layer, {"weight": torch.ones(4, 4)}):
                pass
        assert torch.equal(layer.weight.full_tensor(), before)
    finally:
        dist.destroy_process_group()
