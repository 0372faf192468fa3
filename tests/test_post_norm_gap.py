"""The post-norm gap: weight form and residual form of one edit agree on a pre-norm model and differ on a post-norm
one (the tiny DiffusionGemma organism), and `family.edit_at=residual` trains and evaluates at the residual entries."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from subspace.analysis.post_norm_gap import along_edit, gap_rows, residual_form
from subspace.data.loading import load_prompts
from subspace.evaluation.evaluator import Evaluator
from subspace.families import DiffusionGemmaFamily, family_for
from subspace.families.base import Family
from subspace.interventions.edit import ProjectionEdit
from tests.conftest import compose_model

PROMPTS = load_prompts("builtin:harmful_train", limit=6)
LAMBDA = 0.5


def layer_shared_edit(family: Family, layers: list[int], seed: int = 0) -> ProjectionEdit:
    """Rank 1, one random direction per layer shared by its writers (method.scope=per_layer), strength LAMBDA."""
    generator = torch.Generator().manual_seed(seed)
    directions = {i: torch.nn.functional.normalize(torch.randn(family.hidden_size, generator=generator), dim=0)
                  for i in layers}
    sites = family.writer_sites(layers)
    bases = torch.stack([directions[s.layer][:, None] for s in sites])
    return ProjectionEdit([s.name for s in sites], bases, torch.full((len(sites),), LAMBDA))


@pytest.fixture(scope="module")
def gemma(cache_dir):
    return instantiate(compose_model("tiny_diffusion_gemma_organism", cache_dir))


def forms_left(bundle, edit: ProjectionEdit) -> tuple[list[dict], ProjectionEdit]:
    family = family_for(bundle.model, **bundle.family_options)
    residual = residual_form(edit, family)
    evaluator = Evaluator(bundle, family, progress=False)
    measure = lambda edited: along_edit(evaluator, PROMPTS, residual, edited)  # noqa: E731
    before = measure(None)
    rows = gap_rows(family, residual, before, measure(edit.merged(bundle.model)),
                    measure(residual.applied(bundle.model)))
    return rows, residual


def test_pre_norm_weight_form_is_the_residual_form(tiny_organism):
    family = family_for(tiny_organism.model)
    edit = layer_shared_edit(family, [1, 2])
    rows, residual = forms_left(tiny_organism, edit)
    assert residual.sites == edit.sites  # a pre-norm writer's output is what joins the residual stream
    for row in rows:
        assert row["weight_form_left"] == pytest.approx(row["residual_form_left"], abs=1e-4)
    assert rows[0]["residual_form_left"] == pytest.approx(1 - LAMBDA, abs=1e-4)  # first edited entry: input unedited


def test_post_norm_weight_form_leaves_more_than_the_projection(gemma):
    family = family_for(gemma.model, **gemma.family_options)
    edit = layer_shared_edit(family, [1, 2])
    rows, residual = forms_left(gemma, edit)
    assert [s.rsplit(".", 1)[-1] for s in residual.sites] == ["post_attention_layernorm",
                                                              "post_feedforward_layernorm"] * 2
    first = rows[0]  # layer 1's attention: nothing edited upstream, so the projection leaves exactly 1 − λ
    assert first["residual_form_left"] == pytest.approx(1 - LAMBDA, abs=1e-4)
    assert abs(first["weight_form_left"] - (1 - LAMBDA)) > 0.01  # the post-norm turned some back towards U


def test_residual_form_refuses_sites_of_one_entry_with_different_bases(gemma):
    family = family_for(gemma.model, **gemma.family_options)
    edit = layer_shared_edit(family, [1])
    edit.bases[-1] = edit.bases[-1].roll(1, dims=0)  # the experts' site: another unit direction
    with pytest.raises(ValueError, match="post_feedforward_layernorm.*different bases"):
        residual_form(edit, family)


def test_edit_at_residual_names_the_post_norms_and_checks_its_value(gemma):
    residual = DiffusionGemmaFamily(gemma.model, edit_at="residual")
    names = [s.name for s in residual.writer_sites([0])]
    assert names == ["model.decoder.layers.0.post_attention_layernorm",
                     "model.decoder.layers.0.post_feedforward_layernorm"]
    with pytest.raises(ValueError, match="edit_at='weights'.*writers"):
        DiffusionGemmaFamily(gemma.model, edit_at="weights")


def test_train_py_with_edit_at_residual_evaluates_with_hooks_and_exports_no_adapter(tmp_path, cache_dir, gemma):
    from tests.conftest import REQUIRED, run_train

    metrics = run_train(tmp_path, cache_dir, "model.family.edit_at=residual", model="tiny_diffusion_gemma_organism")
    assert REQUIRED <= metrics.keys()
    edit = ProjectionEdit.load(tmp_path / "run" / "edit.safetensors")
    assert all(s.endswith(("post_attention_layernorm", "post_feedforward_layernorm")) for s in edit.sites)
    assert not (tmp_path / "run" / "adapter").exists()
