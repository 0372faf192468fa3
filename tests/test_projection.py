"""The projection maths and the two forms of an edit (hooks vs weight deltas)."""

from __future__ import annotations

import torch

from subspace.interventions.edit import ProjectionEdit
from subspace.interventions.projection import orthonormalize, project_out
from tests.conftest import assert_hooks_match_weight_deltas, random_edit


def test_orthonormalize_gives_orthonormal_columns():
    u = orthonormalize(torch.randn(3, 40, 5))
    assert torch.allclose(u.transpose(-1, -2) @ u, torch.eye(5).expand(3, 5, 5), atol=1e-5)


def test_project_out_removes_the_component_exactly_at_full_strength():
    u = orthonormalize(torch.randn(40, 3))
    x = torch.randn(7, 40)
    assert (project_out(x, u) @ u).abs().max() < 1e-5
    half = project_out(x, u, 0.5)
    assert torch.allclose(half @ u, 0.5 * (x @ u), atol=1e-5)


def test_project_out_keeps_dtype_and_computes_in_float32():
    u = orthonormalize(torch.randn(16, 2))
    x = torch.randn(4, 16).to(torch.bfloat16)
    assert project_out(x, u).dtype == torch.bfloat16


def test_hooks_and_weight_deltas_give_the_same_logits(tiny, family):
    assert_hooks_match_weight_deltas(tiny.model, random_edit(family, rank=3), len(tiny.tokenizer))


def test_hooks_leave_the_model_untouched_after_the_block(tiny, family):
    edit = random_edit(family, rank=2, strength=1.0)
    ids = torch.randint(3, len(tiny.tokenizer), (1, 8))
    before = tiny.model(ids).logits
    with edit.applied(tiny.model):
        pass
    assert torch.equal(before, tiny.model(ids).logits)


def test_full_strength_edit_removes_the_subspace_from_the_residual_stream(tiny, family):
    """One global U at λ=1 on every writer: no layer after the first writes along U."""
    u = orthonormalize(torch.randn(family.hidden_size, 2))
    sites = [s.name for s in family.writer_sites()]
    edit = ProjectionEdit(sites, u.expand(len(sites), -1, -1), torch.ones(len(sites)))
    ids = torch.randint(3, len(tiny.tokenizer), (1, 8))
    with edit.applied(tiny.model):
        hidden = tiny.model(ids, output_hidden_states=True).hidden_states
    embed_part = hidden[0] @ u
    for h in hidden[1:-1]:  # the last entry is after the final norm
        assert torch.allclose(h @ u, embed_part, atol=1e-4)


def test_edit_save_load_round_trip(tmp_path, family):
    edit = random_edit(family, rank=2)
    edit.meta["note"] = "x"
    edit.save(tmp_path / "edit.safetensors")
    loaded = ProjectionEdit.load(tmp_path / "edit.safetensors")
    assert loaded.sites == edit.sites and loaded.meta == {"note": "x"}
    assert torch.equal(loaded.bases, edit.bases) and torch.equal(loaded.strengths, edit.strengths)
