"""Loss terms and torchmetrics metrics."""

from __future__ import annotations

import math

import pytest
import torch

from subspace.evaluation.judges import MarkerJudge
from subspace.evaluation.metrics import ResponseKL, RefusalRate
from subspace.objectives.losses import kl_divergence, refusal_loss
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
    with pytest.raises(ValueError, match="first_token"):
        RefusalKLObjective(refusal="whole_sentence")


def test_refusal_loss_per_position_reads_each_positions_own_tokens():
    """Masked diffusion: position j's refusal tokens are scored at position j only; −1 pads a row."""
    probs = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]])  # [batch 1, positions 2, vocab 3]
    ids = torch.tensor([[0, -1], [2, 1]])  # position 0: token 0; position 1: tokens 2 and 1
    expected = -(torch.log1p(torch.tensor(-0.5)) + torch.log1p(torch.tensor(-0.9))) / 2
    assert torch.allclose(refusal_loss(probs.log(), ids), expected)
    one_position = refusal_loss(probs[:, 0].log(), torch.tensor([0]))  # [batch, vocab] and [M]: as before
    assert torch.allclose(one_position, -torch.log1p(torch.tensor(-0.5)))
