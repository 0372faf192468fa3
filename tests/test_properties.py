"""Property-based tests (hypothesis) of the invariants every edit relies on, over random shapes, ranks and dtypes:
the projection is idempotent and removes its subspace, the learned basis stays orthonormal through optimiser
steps, the LoRA form of an edit equals its weight form, and merging then unmerging is the identity, bitwise."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from subspace.interventions.merge import merged_deltas
from subspace.interventions.projection import orthonormalize, project_out, projected_weight, weight_factors
from subspace.training.subspace_module import LearnedSubspace

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Rounding of one cast back to the activation dtype, relative to the input's scale.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}

PROPERTIES = settings(max_examples=40, deadline=None)


@st.composite
def shapes(draw, max_dim: int = 48) -> tuple[int, int, int]:
    """(d, k, seed) with 1 ≤ k < d: a proper subspace of the hidden space."""
    d = draw(st.integers(2, max_dim))
    return d, draw(st.integers(1, d - 1)), draw(st.integers(0, 2**31 - 1))


def basis(d: int, k: int, seed: int, *lead: int) -> torch.Tensor:
    return orthonormalize(torch.randn(*lead, d, k, generator=torch.Generator().manual_seed(seed)))


@PROPERTIES
@given(shapes(), st.sampled_from(DTYPES))
def test_projection_removes_the_subspace_and_is_idempotent(shape, dtype):
    d, k, seed = shape
    u = basis(d, k, seed)
    x = torch.randn(5, d, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    once = project_out(x, u)
    tol = TOLERANCE[dtype] * (1 + x.float().abs().max().item()) * d ** 0.5
    assert once.dtype == dtype
    assert (once.float() @ u).abs().max() <= tol
    assert (project_out(once, u).float() - once.float()).abs().max() <= tol


@PROPERTIES
@given(shapes(), st.floats(0.0, 1.0))
def test_partial_strength_scales_only_the_subspace_component(shape, strength):
    d, k, seed = shape
    u = basis(d, k, seed)
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(seed + 1))
    out = project_out(x, u, strength)
    assert torch.allclose(out @ u, (1 - strength) * (x @ u), atol=1e-5)
    rest = x - (x @ u) @ u.T  # the orthogonal complement is untouched
    assert torch.allclose(out - (out @ u) @ u.T, rest, atol=1e-5)


@PROPERTIES
@given(shapes(max_dim=24), st.integers(1, 3), st.integers(1, 5), st.sampled_from(["adam", "sgd"]))
def test_learned_basis_stays_orthonormal_through_training_steps(shape, sites, steps, optimiser):
    d, k, seed = shape
    torch.manual_seed(seed)
    subspace = LearnedSubspace(torch.randn(sites, d, k), groups=list(range(sites)), learn_strength=True)
    opt = (torch.optim.Adam if optimiser == "adam" else torch.optim.SGD)(subspace.parameters(), lr=0.5)
    target = torch.randn(d)
    for _ in range(steps):
        bases, strengths = subspace()
        loss = ((bases.transpose(-1, -2) @ target) ** 2).sum() * strengths.sum()  # any smooth objective
        opt.zero_grad()
        loss.backward()
        opt.step()
    bases, strengths = subspace()
    eye = torch.eye(k).expand(sites, k, k)
    assert torch.allclose(bases.transpose(-1, -2) @ bases, eye, atol=1e-4)
    assert torch.isfinite(strengths).all() and ((0 <= strengths) & (strengths <= 1)).all()


@PROPERTIES
@given(shapes(), st.integers(1, 40), st.floats(0.0, 1.0), st.integers(0, 4))
def test_lora_form_equals_weight_form(shape, fan_in, strength, experts):
    """`W + B A` (the LoRA PEFT loads) is `(I − λUUᵀ) W`, and applying it equals projecting the writer's output;
    with `experts > 0` the weight is a stacked `[E, d, in]` expert tensor, each expert edited alike."""
    d, k, seed = shape
    g = torch.Generator().manual_seed(seed)
    u = basis(d, k, seed)
    weight = torch.randn(*([experts] if experts else []), d, fan_in, generator=g)
    a, b = weight_factors(weight, u, strength)
    assert a.shape[-2:] == (k, fan_in) and b.shape[-2:] == (d, k)
    direct = weight - strength * u @ (u.T @ weight)
    assert torch.allclose(weight + b @ a, direct, atol=1e-4)
    assert torch.allclose(projected_weight(weight, u, strength), direct, atol=1e-4)
    x = torch.randn(4, fan_in, generator=g)
    out = x @ weight.transpose(-1, -2)
    assert torch.allclose(x @ (weight + b @ a).transpose(-1, -2), project_out(out, u, strength), atol=1e-4)


@PROPERTIES
@given(st.lists(st.tuples(st.integers(1, 16), st.integers(1, 16)), min_size=1, max_size=4),
       st.sampled_from(DTYPES), st.integers(0, 2**31 - 1), st.booleans(), st.booleans())
def test_merge_then_unmerge_is_the_identity_bitwise(layer_shapes, dtype, seed, tie, interrupt):
    """Whatever the dtype (rounding makes `(w + δ) − δ ≠ w`), whether two names share one tensor, and whether the
    block ends normally or by an exception, every parameter is bit-identical afterwards."""
    torch.manual_seed(seed)
    model = nn.Sequential(*(nn.Linear(i, o) for i, o in layer_shapes)).to(dtype)
    if tie:
        model.append(nn.Linear(layer_shapes[0][0], layer_shapes[0][1]).to(dtype))
        model[-1].weight = model[0].weight
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    deltas = {name: torch.randn(p.shape) for name, p in model.named_parameters(remove_duplicate=False)
              if name.endswith("weight") and not (tie and name == f"{len(model) - 1}.weight")}

    class Interrupted(Exception):
        pass

    try:
        with merged_deltas(model, deltas):
            changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
            assert changed, "the merge changed nothing"
            if interrupt:
                raise Interrupted
    except Interrupted:
        pass
    for name, p in model.named_parameters():
        assert p.dtype == dtype
        assert torch.equal(p, before[name]), name
    if tie:
        assert model[-1].weight is model[0].weight

