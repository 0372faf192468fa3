"""The cached original distributions: full (the default, bit-identical to before) or top-k with the rest pooled."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from transformers import LlamaConfig

from subspace.families import CausalFamily
from subspace.objectives.losses import coarse_kl_divergence, kl_divergence, remainder_logprob
from subspace.objectives.reference import ReferenceDistributions
from subspace.objectives.refusal_kl import RefusalKLObjective
from subspace.profiling.estimate import estimate_memory
from subspace.training.subspace_module import LearnedSubspace, SubspaceModule
from subspace.utils.digest import tensor_digest
from tests.conftest import compose_config, tiny_fit

VOCAB = 1000


def logprobs(*shape: int, scale: float = 5.0, seed: int = 0) -> torch.Tensor:
    """Peaked log-probs [*shape, VOCAB] (softmax of scaled normal logits), as a language model's are."""
    generator = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(*shape, VOCAB, generator=generator) * scale, -1)


def edited(original: torch.Tensor, shift: float = 0.5, seed: int = 1) -> torch.Tensor:
    """An edited model's log-probs: the original's logits moved a little, as a small edit moves them."""
    generator = torch.Generator().manual_seed(seed)
    return torch.log_softmax(original + shift * torch.randn(original.shape, generator=generator), -1)


@pytest.mark.parametrize("shape", [(6,), (6, 3)], ids=["one-position", "positions"])
def test_full_mode_is_the_old_kl_bit_for_bit(shape):
    p = logprobs(*shape)
    q = edited(p[[4, 1, 2]])
    index = torch.tensor([4, 1, 2])
    for top_k in (None, VOCAB, VOCAB + 7):  # K ≥ vocab drops nothing, so it caches in full
        reference = ReferenceDistributions.build(iter([p[:2], p[2:]]), top_k)
        assert reference.top_k is None and torch.equal(reference.logprobs, p)
        assert torch.equal(reference[index].kl(q), kl_divergence(p[index], q))
        assert reference.digest() == tensor_digest(p)  # what checkpoints stored before compact caches existed


def test_top_k_of_the_whole_vocabulary_is_the_full_kl():
    """The coarse KL itself, with K = vocab (which `of` would cache in full): an empty rest bin adds nothing
    and gives no NaN, in the value or the gradient."""
    p = logprobs(5, 2)
    q = edited(p).requires_grad_()
    top, ids = p.topk(VOCAB, dim=-1)
    kl = coarse_kl_divergence(top, ids.int(), remainder_logprob(p, ids), q)
    assert torch.allclose(kl, kl_divergence(p, q), rtol=0, atol=1e-6)
    kl.backward()
    assert torch.isfinite(q.grad).all()


def test_top_k_kl_is_a_lower_bound_that_grows_with_k_and_is_close_for_peaked_distributions():
    p = logprobs(32, 4)
    q = edited(p)
    full = kl_divergence(p, q).item()
    bounds = [ReferenceDistributions.of(p, k).kl(q).item() for k in (1, 5, 50, 200, VOCAB - 1)]
    # pooling K+1 bins refines pooling fewer, so the KL can only grow with K, up to the full KL (float32 slack)
    assert all(a <= b + 1e-6 for a, b in zip(bounds, bounds[1:] + [full]))
    assert bounds[0] < 0.9 * full  # one kept token loses much: the check below is not vacuous
    assert abs(bounds[2] - full) / full < 0.02  # K = 50 of 1000 on a peaked distribution: within 2%
    assert abs(bounds[-1] - full) < 1e-5


def test_rest_mass_is_exact_when_the_top_k_hold_nearly_all_of_it():
    """log(1 − Σ top-K p) would cancel to log 0 in float32; the logsumexp over the other tokens does not."""
    p = torch.log_softmax(torch.tensor([[30.0, 29.0, 0.0, -1.0]]), -1)
    reference = ReferenceDistributions.of(p, 2)
    expected = torch.logsumexp(p.double()[:, 2:], -1)
    assert torch.allclose(reference.rest.double(), expected, rtol=1e-6)
    assert torch.log1p(-reference.logprobs.exp().sum(-1)).isinf().all()  # the naive form fails here


def test_gradient_reaches_the_kept_tokens_and_the_pooled_rest():
    p = logprobs(4, 2)
    logits = (p + 0.5 * torch.randn(p.shape)).requires_grad_()
    reference = ReferenceDistributions.of(p, 10)
    reference.kl(torch.log_softmax(logits, -1)).backward()
    assert torch.isfinite(logits.grad).all()
    kept = torch.zeros(p.shape, dtype=torch.bool).scatter_(-1, reference.ids.long(), True)
    assert (logits.grad[kept] != 0).all() and (logits.grad[~kept] != 0).any()


def test_index_to_and_nbytes_of_a_compact_cache():
    p, k = logprobs(8, 3), 20
    full, compact = ReferenceDistributions.of(p), ReferenceDistributions.of(p, k)
    assert compact.top_k == k and compact.ids.dtype == torch.int32 and len(compact) == 8
    assert full.nbytes == 8 * 3 * ReferenceDistributions.position_bytes(VOCAB, None) == 8 * 3 * VOCAB * 4
    assert compact.nbytes == 8 * 3 * ReferenceDistributions.position_bytes(VOCAB, k) == 8 * 3 * (8 * k + 4)
    assert full.nbytes / compact.nbytes == pytest.approx(VOCAB / (2 * k + 1))  # int32 ids: ≈ vocab/2K, not vocab/K
    index = torch.tensor([5, 0])
    picked = compact[index].to("cpu")
    assert all(torch.equal(a, b[index]) for a, b in zip(picked.tensors(), compact.tensors()))
    assert torch.equal(picked.kl(p[index]), torch.zeros(()))  # P against itself


def test_digest_covers_k_and_every_cached_tensor():
    p = logprobs(4)
    digests = {ReferenceDistributions.of(p, k).digest() for k in (None, 5, 6)}
    assert len(digests) == 3
    nudged = p.clone()
    nudged[0, p[0].topk(6).indices[-1]] -= 1.0  # the 6th most likely token: only the rest mass changes
    assert ReferenceDistributions.of(nudged, 5).digest() != ReferenceDistributions.of(p, 5).digest()


@pytest.mark.parametrize("bad", [0, -3, 2.5, "50", True])
def test_bad_kl_top_k_is_refused_naming_the_value(tiny, bad):
    message = rf"objective.kl_top_k={bad!r} is not valid: use null .* or an integer ≥ 1"
    with pytest.raises(ValueError, match=message):
        RefusalKLObjective(kl_top_k=bad)
    with pytest.raises(ValueError, match=message):
        ReferenceDistributions.build([logprobs(2)], bad)
    family = CausalFamily(tiny.model)
    subspace = LearnedSubspace(torch.randn(1, family.hidden_size, 2), [0])
    with pytest.raises(ValueError, match=message):
        SubspaceModule(family, [family.writer_sites()[0].name], subspace, torch.tensor([5]), kl_top_k=bad)


def test_config_default_is_the_full_vocabulary_and_k_reaches_the_objective():
    assert instantiate(compose_config().objective).kl_top_k is None
    assert instantiate(compose_config("objective.kl_top_k=64").objective).kl_top_k == 64


def test_memory_estimate_counts_the_compact_cache():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2)
    full, compact = (estimate_memory(config, 1, 2, 8, 64, 4, 1, 256, 2, kl_top_k=k)["kl_cache_gib"] for k in (None, 50))
    assert full == 256 * 2 * VOCAB * 4 / 1024 ** 3 and compact == 256 * 2 * (8 * 50 + 4) / 1024 ** 3


def test_training_with_top_k_matches_full_at_step_zero_and_resumes_only_with_the_same_k(tiny, tmp_path):
    """Same batch, same initial subspace: the refusal term is the same, the KL term a smaller bound. The tiny random
    model's distributions are nearly flat, so K = 128 of 512 keeps only part of the KL (a real model's are peaked)."""
    full_module, full = tiny_fit(tiny, tmp_path / "full", steps=1)
    module, compact = tiny_fit(tiny, tmp_path / "top_k", steps=1, kl_top_k=128)
    assert module.reference.top_k == 128 and module.reference.nbytes < full_module.reference.nbytes / 1.9
    assert torch.isfinite(compact.callback_metrics["train/loss"])
    assert torch.equal(compact.callback_metrics["train/refusal"], full.callback_metrics["train/refusal"])
    kl, full_kl = compact.callback_metrics["train/kl"].item(), full.callback_metrics["train/kl"].item()
    assert 0.1 * full_kl < kl <= full_kl * (1 + 1e-4)
    tiny_fit(tiny, tmp_path / "top_k", steps=2, resume=True, kl_top_k=128)  # the same cache: resumes
    with pytest.raises(ValueError, match="harmless training prompts or objective.kl_top_k changed"):
        tiny_fit(tiny, tmp_path / "top_k", steps=3, resume=True, kl_top_k=64)
