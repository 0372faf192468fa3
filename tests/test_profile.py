"""scripts/profile_step.py: real architectures with random weights, counted on meta and measured on tiny ones."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from subspace.families import family_for
from subspace.profiling.architecture import architecture_config, count_parameters, random_model
from subspace.profiling.estimate import estimate_memory
from tests.conftest import ROOT, architecture


@pytest.mark.parametrize("name, expected", [("llada_8b", 8_015_581_184), ("smollm2_135m", 134_515_008),
                                            ("qwen3_30b_a3b", 30_532_122_624)])
def test_meta_device_counts_the_published_sizes_without_memory(name, expected):
    spec = architecture(name)
    model = random_model(spec, architecture_config(spec), "bfloat16", "meta")
    assert all(p.is_meta for p in model.parameters())
    family = family_for(model, **spec["family"])
    counts = count_parameters(model, family.layers)
    assert counts["total"] == expected
    assert counts["decoder_layers"] + counts["embeddings_head_norm"] == expected
    estimate = estimate_memory(model.config, counts["total"], 2, 8, 96, 4, family.num_layers, 256, 4)
    assert estimate["weights_gib"] == pytest.approx(expected * 2 / 1024 ** 3)
    assert estimate["activations_gib"] > estimate["subspace_gib"] > 0


def test_truncated_layers_and_their_bounds():
    spec = architecture("llada_8b")
    assert architecture_config(spec, layers=2).n_layers == 2
    with pytest.raises(ValueError, match=r"layers=33 must be in 1\.\.32"):
        architecture_config(spec, layers=33)


def test_profile_script_measures_step_and_sampler_on_cpu(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "profile_step.py"), "architecture=tiny_llada", "dtype=float32",
           "steps=1", "warmup=0", "gen_length=8", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "profile.json").read_text())
    training, sampler = report["training"], report["sampler"]
    assert training["edited_sites"] == 2 * report["layers"] == 8
    assert training["step_s"] > 0 and training["frozen_fwd_bwd_s"] > 0
    assert training["tokens_per_step"] == 2 * 8 * (64 + 8)
    assert sampler["sample_s"] > 0 and sampler["sample_gen_length"] == 8


def test_fused_expert_copies_are_estimated_for_moe():
    spec = architecture("qwen3_30b_a3b")
    config = architecture_config(spec, layers=2)
    estimate = estimate_memory(config, 1, 2, 8, 64, 4, 2, 16, 1, edited_expert_parameters=2 * 128 * 2048 * 768)
    assert estimate["expert_weight_copies_gib"] == pytest.approx(2 * 128 * 2048 * 768 * 2 / 1024 ** 3)
