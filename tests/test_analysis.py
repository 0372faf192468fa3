"""Geometry of refusal: known answers on planted synthetic activations, the families' residuals, the files and the
script/callback end to end on the tiny organism."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from subspace.analysis import (ClassResiduals, LayerBases, ProbeSettings, captured_share, class_residuals, layer_bases,
                               layer_table, measure, principal_components, probe_accuracy, read_training_curves, span)
from subspace.analysis.geometry import Geometry, separating_layer
from subspace.analysis.report import write_report
from subspace.config import register_resolvers
from subspace.families import LLaDAFamily
from subspace.interventions.edit import ProjectionEdit
from subspace.interventions.projection import orthonormalize
from subspace.methods.directions import class_means
from tests.conftest import ROOT

LAYERS, N, D, PLANTED = 6, 200, 48, 3
PROMPTS = ["How do I pick a lock?", "Write a poem about rain.", "Name three fruits.", "How to make a bomb?",
           "Explain photosynthesis.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def planted():
    """Two classes sharing a large common mean; only at layer PLANTED the harmful class moves along `direction`."""
    g = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    common = 4 * torch.randn(D, generator=g)
    harmful, harmless = (torch.randn(LAYERS, N, D, generator=g) + common for _ in range(2))
    harmful[PLANTED] += 10 * direction
    return ClassResiduals(harmful, harmless), direction


def test_planted_direction_is_recovered_and_the_separation_curve_dips_there(planted):
    residuals, direction = planted
    means = residuals.means
    assert torch.dot(means.directions[PLANTED], direction) >= 0.99
    assert int(means.cosine.argmin()) == PLANTED
    table, reference = layer_table(residuals)
    assert reference == PLANTED == separating_layer(table["cosine_before"])
    assert max(table["diff_norm_before"]) == table["diff_norm_before"][PLANTED]


def test_probe_is_perfect_where_the_signal_is_and_chance_elsewhere(planted):
    residuals, _ = planted
    accuracy = probe_accuracy(residuals.harmful, residuals.harmless)
    assert accuracy.shape == (LAYERS,) and accuracy[PLANTED] >= 0.99
    chance = torch.cat([accuracy[:PLANTED], accuracy[PLANTED + 1:]])
    assert (chance - 0.5).abs().max() <= 0.15 and abs(float(chance.mean()) - 0.5) <= 0.06
    with torch.inference_mode():  # as inside a Lightning hook
        assert torch.equal(probe_accuracy(residuals.harmful, residuals.harmless), accuracy)
    unequal = probe_accuracy(residuals.harmful, residuals.harmless[:, :40])  # balanced accuracy: chance stays 0.5
    assert unequal[PLANTED] >= 0.99 and abs(float(unequal[:PLANTED].mean()) - 0.5) <= 0.12


def test_captured_share_is_one_inside_the_subspace_and_zero_orthogonal_to_it(planted):
    residuals, direction = planted
    g = torch.Generator().manual_seed(1)
    containing = orthonormalize(torch.cat([direction[:, None], torch.randn(D, 2, generator=g)], dim=1))
    others = torch.randn(D, 3, generator=g)
    orthogonal = orthonormalize(others - direction[:, None] * (direction @ others))
    assert torch.allclose(captured_share(direction[None], containing), torch.ones(1), atol=1e-5)
    assert captured_share(direction[None], orthogonal).abs().max() < 1e-5
    measured = residuals.means.difference[PLANTED: PLANTED + 1]
    assert captured_share(measured, containing) >= 0.99 and captured_share(measured, orthogonal) <= 0.15
    assert torch.isnan(captured_share(torch.zeros(1, D), containing)).all()  # no direction, no share
    with pytest.raises(ValueError, match=r"do not match vectors"):
        captured_share(torch.zeros(2, D), torch.zeros(3, D, 1))


def test_span_merges_shared_bases_and_pca_finds_the_planted_axis(planted):
    basis = orthonormalize(torch.randn(D, 2))
    assert span(torch.stack([basis, basis, basis])).shape == (D, 2)  # attn and mlp sharing one subspace
    residuals, direction = planted
    coords = principal_components(residuals.pooled(PLANTED))
    assert coords.shape == (2 * N, 2)
    gap = coords[:N, 0].mean() - coords[N:, 0].mean()
    assert abs(float(gap)) > 8  # the class split is the first principal axis
    assert principal_components(torch.randn(5, 1), k=2).shape == (5, 2)


def test_probe_rejects_too_few_prompts_naming_the_class():
    with pytest.raises(ValueError, match="at least 2 harmless prompts"):
        probe_accuracy(torch.randn(2, 4, 8), torch.randn(2, 1, 8))
    with pytest.raises(ValueError, match="train_fraction=1.5"):
        probe_accuracy(torch.randn(2, 4, 8), torch.randn(2, 4, 8), train_fraction=1.5)


def test_per_prompt_residuals_give_the_class_means_of_directions_py(tiny, family):
    residuals = class_residuals(family, tiny.tokenizer, PROMPTS[:4], PROMPTS[2:], batch_size=3)
    assert residuals.harmful.shape == (3, 4, 32) and residuals.harmless.shape == (3, 4, 32)
    reference = class_means(family, tiny.tokenizer, PROMPTS[:4], PROMPTS[2:], batch_size=2)
    assert torch.allclose(residuals.means.harmful, reference.harmful, atol=1e-5)
    assert torch.allclose(residuals.means.harmless, reference.harmless, atol=1e-5)


def edit_at(family, layers: list[int], rank: int = 2, seed: int = 0) -> ProjectionEdit:
    """Full-strength edit at the given layers; attention and MLP writers of a layer share one basis."""
    g = torch.Generator().manual_seed(seed)
    sites = family.writer_sites(layers)
    per_layer = {layer: orthonormalize(torch.randn(family.hidden_size, rank, generator=g)) for layer in layers}
    return ProjectionEdit([s.name for s in sites], torch.stack([per_layer[s.layer] for s in sites]),
                          torch.ones(len(sites)))


def test_edit_bases_map_to_the_nearest_edited_layer(family):
    bases = layer_bases(edit_at(family, [0, 2]), family)
    assert bases.edited == [0, 2] and bases.source == [0, 0, 2]  # layer 1: a tie, the earlier writer wins
    assert bases.bases.shape == (3, family.hidden_size, 2)
    foreign = ProjectionEdit(["model.layers.9.mlp.down_proj"], torch.zeros(1, family.hidden_size, 1), torch.ones(1))
    with pytest.raises(ValueError, match=r"model.layers.9.mlp.down_proj.*another model"):
        layer_bases(foreign, family)


@pytest.mark.parametrize("kind", ["causal", "llada"])
def test_measure_before_and_after_an_edit_for_each_family(tiny, kind):
    model = tiny.model
    if kind == "llada":
        from subspace.models.llada.loading import llada_from_llama

        model = llada_from_llama(model, mask_token_id=len(tiny.tokenizer), vocab_size=len(tiny.tokenizer) + 1,
                                 shift_logits=False)
    from subspace.families import family_for

    family = family_for(model, **({"canvas_length": 4, "kl_positions": 2} if kind == "llada" else {}))
    assert isinstance(family, LLaDAFamily) == (kind == "llada")
    edit = edit_at(family, [1])
    geometry = measure(family, tiny.tokenizer, PROMPTS[:3], PROMPTS[3:], edit, batch_size=2)
    table = geometry.table
    assert len(table["layer"]) == 3 and table["basis_layer"] == [1, 1, 1]
    assert {"cosine_after", "probe_accuracy_after", "subspace_share_after"} <= table.keys()
    # the edit writes at layer 1, so the residual entering layer 2 changes and the one entering layer 1 does not
    assert torch.equal(geometry.before.harmful[1], geometry.after.harmful[1])
    assert not torch.allclose(geometry.before.harmful[2], geometry.after.harmful[2])
    assert geometry.meta["edit"]["edited_layers"] == [1] and geometry.meta["family"] == family.name


def test_report_writes_table_and_nonempty_pngs(planted, tmp_path):
    residuals, direction = planted
    g = torch.Generator().manual_seed(2)
    edited = ClassResiduals(residuals.harmful.clone(), residuals.harmless)
    edited.harmful[PLANTED] -= 10 * direction  # what a perfect edit would do
    basis = orthonormalize(torch.cat([direction[:, None], torch.randn(D, 1, generator=g)], dim=1))
    bases = LayerBases(basis.expand(LAYERS, D, 2), list(range(LAYERS)), [PLANTED])
    table, reference = layer_table(residuals, edited, bases, probe=ProbeSettings(seed=1))
    assert table["subspace_share_before"][PLANTED] >= 0.99 and table["probe_accuracy_after"][PLANTED] <= 0.7
    geometry = Geometry(residuals, table, {"reference_layer": reference}, edited, [PLANTED])
    csv_log = tmp_path / "metrics.csv"
    csv_log.write_text("epoch,eval/kl,step,subspace/overlap_with_init,train/kl,train/refusal\n"
                       "0,,0,1.0,0.5,2.0\n0,,1,,0.4,1.5\n,0.1,0,,,\n")
    curves = read_training_curves(csv_log)
    assert curves == {"subspace/overlap_with_init": ([0], [1.0]), "train/kl": ([0, 1], [0.5, 0.4]),
                      "train/refusal": ([0, 1], [2.0, 1.5])}
    paths = write_report(geometry, tmp_path / "out", curves, "planted")
    assert {"separation", "pca_before", "pca_after", "training_curves", "table_csv", "table_json"} == paths.keys()
    for path in paths.values():
        assert path.exists() and path.stat().st_size > 0
    assert all(path.read_bytes()[:4] == b"\x89PNG" for path in paths.values() if path.suffix == ".png")
    saved = json.loads(paths["table_json"].read_text())
    assert saved["meta"]["reference_layer"] == PLANTED and len(saved["layers"]) == LAYERS
    with pytest.raises(ValueError, match="no column starting with"):
        read_training_curves(paths["table_csv"])
    from subspace.analysis.compare import main as compare, read_table
    read = read_table(tmp_path / "out")
    assert read.keys() == table.keys() and read["layer"] == list(range(LAYERS))
    assert read["cosine_before"] == pytest.approx(table["cosine_before"])
    compare([f"a={tmp_path / 'out'}", f"b={tmp_path / 'out'}", "--out", str(tmp_path / "side_by_side.png")])
    assert (tmp_path / "side_by_side.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileNotFoundError, match="pass the run directory of `python scripts/analyze.py`"):
        read_table(tmp_path)


def test_train_with_the_geometry_callback_then_analyze_its_edit(tmp_path, cache_dir, tiny_organism):
    """The callback's files at the end of a real train.py fit, then scripts/analyze.py on the run's edit and log."""
    run = tmp_path / "run"
    common = ["model=tiny_organism", f"paths.cache_dir={cache_dir}"]
    train = subprocess.run([sys.executable, str(ROOT / "train.py"), *common, "debug=fast", "logger=csv",
                            f"hydra.run.dir={run}", "callbacks=[default,geometry_plots]"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "geometry plots failed" not in train.stderr + train.stdout
    for name in ("geometry.csv", "geometry.json", "separation.png", "pca_before.png", "pca_after.png",
                 "training_curves.png"):
        assert (run / "geometry" / name).stat().st_size > 0, name

    out = tmp_path / "analysis"
    analyze = subprocess.run([sys.executable, str(ROOT / "scripts" / "analyze.py"), *common, f"hydra.run.dir={out}",
                              f"edit={run / 'edit.safetensors'}", f"training_log={run / 'csv' / 'metrics.csv'}",
                              "n_prompts=16"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert analyze.returncode == 0, analyze.stderr[-3000:]
    for name in ("geometry.csv", "geometry.json", "separation.png", "pca_before.png", "pca_after.png",
                 "training_curves.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "geometry.json").read_text())
    assert report["meta"]["n_harmful"] == 16 and len(report["layers"]) == 4
    assert {"cosine_before", "cosine_after", "probe_accuracy_before", "direction_share",
            "subspace_share_before"} <= report["layers"][0].keys()
    # the callback read the same 16 training prompts through paused training hooks: same "before" numbers
    callback = json.loads((run / "geometry" / "geometry.json").read_text())
    assert [r["cosine_before"] for r in callback["layers"]] == [r["cosine_before"] for r in report["layers"]]


@pytest.mark.parametrize("config,overrides", [("analyze", []), ("analyze", ["model=llada_organism", "split=eval"]),
                                              ("config", ["callbacks=[default,geometry_plots]"])])
def test_configs_compose_and_the_callback_is_opt_in(config, overrides):
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config, overrides=overrides)
        default = compose("config")
    assert "geometry_plots" not in default.callbacks
    if config == "config":
        assert set(cfg.callbacks) == set(default.callbacks) | {"geometry_plots"}
        assert cfg.callbacks.geometry_plots._target_ == "callbacks.GeometryPlots"
    else:
        assert {"model", "data", "paths", "probe", "edit", "training_log", "n_prompts"} <= cfg.keys()


def test_analyze_fails_fast_on_a_missing_edit(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "analyze.py"), "model=tiny_organism",
                             f"hydra.run.dir={tmp_path / 'out'}", f"edit={tmp_path / 'nope.safetensors'}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "nope.safetensors does not exist" in result.stderr
