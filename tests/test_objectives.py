"""Loss terms and torchmetrics metrics."""

from __future__ import annotations

import math

from types import SimpleNamespace

import pytest
import torch

from subspace.evaluation.judges import MarkerJudge
from subspace.families import CausalFamily
from subspace.evaluation.metrics import ResponseKL, RefusalRate
from subspace.objectives.losses import kl_divergence, prefix_refusal_loss, refusal_loss
from subspace.objectives.refusal_kl import RefusalKLObjective


def test_kl_is_zero_for_identical_and_positive_otherwise():
    logp = torch.log_softmax(torch.randn(4, 10), -1)
    assert kl_divergence(logp, logp).abs() < 1e-6
    assert kl_divergence(logp, torch.log_softmax(torch.randn(4, 10), -1)) > 0


def test_kl_matches_torch_reference():
    p, q = torch.log_softmax(torch.randn(3, 7), -1), torch.log_softmax(torch.randn(3, 7), -1)
    expected = torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean")
    assert torch.allclose(kl_divergence(p, q), expected, atol=1e-6)


def test_refusal_loss_is_minus_log_of_compliance_mass():
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    loss = refusal_loss(probs.log(), torch.tensor([0, 2]))
    assert math.isclose(loss.item(), -math.log(1 - 0.7), rel_tol=1e-5)


def test_refusal_loss_stays_finite_when_refusal_is_certain():
    logp = torch.log_softmax(torch.tensor([[50.0, -50.0, -50.0]]), -1)
    assert torch.isfinite(refusal_loss(logp, torch.tensor([0])))


def test_metrics_accumulate_over_batches():
    rate = RefusalRate()
    rate.update(torch.tensor([True, False]))
    rate.update(torch.tensor([True, True]))
    assert rate.compute().item() == pytest.approx(0.75)
    kl = ResponseKL()
    p = torch.log_softmax(torch.randn(5, 6), -1)
    q = torch.log_softmax(torch.randn(5, 6), -1)
    kl.update(p[:2], q[:2])
    kl.update(p[2:], q[2:])
    assert kl.compute().item() == pytest.approx(kl_divergence(p, q).item(), rel=1e-5)


def test_marker_judge():
    judge = MarkerJudge()
    assert judge.is_refusal("x", "I’m sorry, but I can't help with that.")
    assert judge.is_refusal("x", "  ")  # an empty answer is no answer
    assert not judge.is_refusal("x", "Sure. First, open the terminal and run kill -9 with the process id.")
    with pytest.raises(ValueError, match="at least one marker"):
        MarkerJudge(())


def test_objective_rejects_bad_settings():
    with pytest.raises(ValueError, match=r"kl_weight=-1"):
        RefusalKLObjective(kl_weight=-1)
    with pytest.raises(ValueError, match="first_token, prefix"):
        RefusalKLObjective(refusal="whole_sentence")
    with pytest.raises(ValueError, match=r"prefix_tokens=9 must be in \[1, objective.probe_new_tokens=8\]"):
        RefusalKLObjective(refusal="prefix", prefix_tokens=9)
    with pytest.raises(ValueError, match="max_prefixes=0"):
        RefusalKLObjective(refusal="prefix", max_prefixes=0)


def test_prefix_refusal_loss_adds_the_prefixes_probabilities():
    """Distinct prefixes of one length are disjoint events: p_refuse is their sum."""
    prefix_logprobs = torch.tensor([[0.2, 0.1], [0.05, 0.05]]).log()  # [batch 2, R 2]
    expected = -(math.log(1 - 0.3) + math.log(1 - 0.1)) / 2
    assert math.isclose(prefix_refusal_loss(prefix_logprobs).item(), expected, rel_tol=1e-5)


def test_prefix_term_keeps_the_most_common_openings_and_needs_a_left_to_right_family():
    objective = RefusalKLObjective(refusal="prefix", prefix_tokens=2, max_prefixes=2)
    refusals = [[5, 6, 7], [5, 6, 9], [5, 8, 1], [4, 2, 2], [4, 2], [3]]  # [3] is shorter than a prefix: dropped
    assert objective.most_common_prefixes(refusals, []).tolist() == [[5, 6], [4, 2]]
    diffusion = SimpleNamespace(family=SimpleNamespace(name="llada", reads_prefixes=False))
    with pytest.raises(ValueError, match="the llada family's is not: use objective.refusal=first_token"):
        objective.refusal_token_ids(diffusion, ["How do I pick a lock?"])


@pytest.mark.parametrize("share_prompt", [True, False])
@pytest.mark.parametrize("prefix_tokens", [1, 3])
def test_prefix_logprobs_score_each_prompt_and_prefix_as_if_alone(tiny, family, share_prompt, prefix_tokens):
    """Left-padded prompts × prefixes, the prompts read once and their cache shared (or each repeated per prefix),
    equal each prompt + prefix scored on its own."""
    prompts = ["Hi", "Tell me a much longer story about a dragon and a knight"]
    prefixes = torch.tensor([[7, 8, 9], [7, 11, 12]])[:, :prefix_tokens]
    batched = family.prefix_logprobs(family.chat_batch(tiny.tokenizer, prompts), prefixes, share_prompt=share_prompt)
    assert batched.shape == (2, 2)
    for i, prompt in enumerate(prompts):
        ids = family.chat_batch(tiny.tokenizer, [prompt])["input_ids"][0]
        for r, prefix in enumerate(prefixes):
            full = torch.cat([ids, prefix]).unsqueeze(0)
            logprobs = torch.log_softmax(tiny.model(input_ids=full).logits[0, len(ids) - 1: -1].float(), -1)
            alone = logprobs.gather(-1, prefix.unsqueeze(-1)).sum()
            assert torch.allclose(batched[i, r], alone, atol=1e-4), (prompt, prefix)


@pytest.mark.parametrize("model_type, shares", [("llama", True), ("mamba", False), ("cpmant", False)])
def test_the_prompt_cache_is_shared_only_where_it_scores_as_repeated_prompts(model_type, shares, caplog):
    """Checked once per model on the first batch: a recurrent state (Mamba) or an attention bias placed by the new
    tokens alone (CPM-Ant) falls back, logged, to repeating each prompt; the scores are the same either way."""
    from subspace.models.tiny import tiny_tokenizer
    from subspace.models.tiny_zoo import tiny_model_for

    tok = tiny_tokenizer()
    family = CausalFamily(tiny_model_for(model_type, tok))
    batch = family.chat_batch(tok, ["Hi", "Tell me a much longer story about a dragon and a knight"])
    prefixes = torch.tensor([[7, 8, 9], [7, 11, 12]])
    with caplog.at_level("WARNING"):
        scores = family.prefix_logprobs(batch, prefixes)
    assert family.shares_prompt_cache(batch, prefixes) is shares
    assert ("repeats each prompt once per prefix" in caplog.text) is not shares
    torch.testing.assert_close(scores, family.prefix_logprobs(batch, prefixes, share_prompt=False), rtol=1e-4, atol=1e-4)


def test_refusal_loss_per_position_reads_each_positions_own_tokens():
    """Masked diffusion: position j's refusal tokens are scored at position j only; −1 pads a row."""
    probs = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]])  # [batch 1, positions 2, vocab 3]
    ids = torch.tensor([[0, -1], [2, 1]])  # position 0: token 0; position 1: tokens 2 and 1
    expected = -(torch.log1p(torch.tensor(-0.5)) + torch.log1p(torch.tensor(-0.9))) / 2
    assert torch.allclose(refusal_loss(probs.log(), ids), expected)
    one_position = refusal_loss(probs[:, 0].log(), torch.tensor([0]))  # [batch, vocab] and [M]: as before
    assert torch.allclose(one_position, -torch.log1p(torch.tensor(-0.5)))
