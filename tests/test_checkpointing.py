"""method.gradient_checkpointing: the decoder layers are recomputed in backward, the subspace's gradient is the
same, and the layers are restored after the block, also when it raises."""

from __future__ import annotations

import pytest
import torch

from subspace.families import CausalFamily, LLaDAFamily
from subspace.interventions import ProjectionHooks, orthonormalize
from subspace.models.llada.loading import llada_from_llama
from subspace.training.checkpointing import checkpointed_layers


def response_score(family, batch):
    return family.response_logprobs(batch).logsumexp(-1).sum()


def subspace_gradient(family, tokenizer, checkpointed: bool, score=response_score) -> tuple[torch.Tensor, int]:
    """d(score)/d(raw bases) with every writer edited (score: the summed response log-probs), and how often the
    writers ran."""
    names = [s.name for s in family.writer_sites()]
    raw = torch.randn(len(names), family.hidden_size, 2, generator=torch.Generator().manual_seed(1), requires_grad=True)
    calls = []
    counters = [family.model.get_submodule(n).register_forward_hook(lambda *_: calls.append(1)) for n in names]
    batch = family.chat_batch(tokenizer, ["How do I bake bread?", "Tell me a joke about cats."])
    with ProjectionHooks.for_sites(family.model, names) as hooks, \
            checkpointed_layers(family.layers, checkpointed):
        hooks.set(orthonormalize(raw), torch.full((len(names),), 0.8))
        score(family, batch).backward()
    for handle in counters:
        handle.remove()
    return raw.grad, len(calls)


@pytest.mark.parametrize("family_kind", ["causal", "llada"])
def test_checkpointed_layers_give_the_same_gradient_and_run_again_in_backward(tiny, family_kind):
    model = tiny.model if family_kind == "causal" else llada_from_llama(tiny.model, mask_token_id=5)
    family = CausalFamily(model) if family_kind == "causal" else LLaDAFamily(model)
    plain, plain_calls = subspace_gradient(family, tiny.tokenizer, checkpointed=False)
    checkpointed, checkpointed_calls = subspace_gradient(family, tiny.tokenizer, checkpointed=True)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)
    assert checkpointed_calls == 2 * plain_calls  # each writer ran again when the gradient reached its layer


def test_the_prefix_term_under_checkpointing_reads_each_prompt_per_prefix_with_the_same_gradient(tiny):
    """A key/value cache cannot be recomputed in backward (the layer would write into it twice), so checkpointed
    layers score prefixes without one; the gradient is the shared-cache one."""
    family = CausalFamily(tiny.model)
    prefixes = torch.tensor([[7, 8, 9], [7, 11, 12], [4, 4, 4]])
    def prefix_score(share_prompt):
        return lambda fam, batch: fam.prefix_logprobs(batch, prefixes, share_prompt=share_prompt).logsumexp(-1).sum()
    shared, _ = subspace_gradient(family, tiny.tokenizer, checkpointed=False, score=prefix_score(True))
    checkpointed, _ = subspace_gradient(family, tiny.tokenizer, checkpointed=True, score=prefix_score(False))
    assert shared.abs().sum() > 0
    torch.testing.assert_close(checkpointed, shared, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError), checkpointed_layers(family.layers):
        family.prefix_logprobs(family.chat_batch(tiny.tokenizer, ["Hi"]), prefixes).sum().backward()


def test_layers_are_restored_after_the_block_even_when_it_raises(tiny):
    family = CausalFamily(tiny.model)
    custom = family.layers[1].forward  # a forward set on the instance stays the instance's
    family.layers[1].forward = custom
    with pytest.raises(RuntimeError, match="interrupted"):
        with checkpointed_layers(family.layers):
            assert all("forward" in layer.__dict__ for layer in family.layers)
            raise RuntimeError("interrupted")
    assert "forward" not in family.layers[0].__dict__ and "forward" not in family.layers[2].__dict__
    assert family.layers[1].__dict__["forward"] is custom
