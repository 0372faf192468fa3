"""scripts/profile_step.py on DiffusionGemma-26B-A4B's real shape (conf/architecture/diffusion_gemma_26b_a4b.yaml), on meta.

Published sizes the count is checked against: 25.82B parameters on the hub's safetensors count of
google/diffusiongemma-26B-A4B-it (vision tower included), 25.2B total / 3.8B active in the model card (the text
model: without the ~550M vision encoder).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from subspace.families import family_for
from subspace.profiling.architecture import architecture_config, count_parameters, random_model
from tests.conftest import ROOT, architecture

TOTAL = 25_823_778_864   # this build, vision tower included, every shared encoder/decoder tensor once
VISION = 572_792_112     # vision_tower + embed_vision (built and counted, never edited)


@pytest.fixture(scope="module")
def built():
    spec = architecture("diffusion_gemma_26b_a4b")
    model = random_model(spec, architecture_config(spec), "bfloat16", "meta")
    return spec, model, family_for(model, **spec["family"])


def test_counts_the_published_sizes_once_despite_shared_tensors(built):
    _, model, family = built
    assert all(p.is_meta for p in model.parameters())
    counts = count_parameters(model, family.layers)
    assert counts["total"] == TOTAL and counts["of_which_vision"] == VISION
    assert counts["decoder_layers"] + counts["embeddings_head_norm"] == TOTAL
    assert counts["total"] == pytest.approx(25.82e9, rel=0.002)               # hub: 25.82B
    assert counts["total"] - VISION == pytest.approx(25.2e9, rel=0.01)         # model card: 25.2B total (text)
    assert counts["active_per_token"] == pytest.approx(3.8e9, rel=0.02)       # model card: 3.8B active
    # Shared, not duplicated: every encoder layer runs the decoder layer's Parameter objects, the LM head is the
    # embedding; summing over every name would count the text model nearly twice.
    encoder = model.get_submodule("model.encoder.language_model.layers")
    assert all(p is q for e, d in zip(encoder, family.layers) for p, q in zip(e.parameters(), d.parameters()))
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    by_name = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert by_name > 1.9 * (TOTAL - VISION) and counts["aliased_names"] > 0
    # Sites are named through the decoder; the fused experts' down_proj is edited as a whole per layer.
    sites = family.writer_sites()
    assert {s.name.split(".layers.")[0] for s in sites} == {"model.decoder"}
    assert sum(s.kind == "expert_out" and s.expert is None for s in sites) == 30


def test_truncated_layers_cut_the_text_config_and_its_layer_types():
    spec = architecture("diffusion_gemma_26b_a4b")
    text = architecture_config(spec, layers=6).get_text_config()
    assert text.num_hidden_layers == 6 and text.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    with pytest.raises(ValueError, match=r"layers=31 must be in 1\.\.30"):
        architecture_config(spec, layers=31)


def test_profile_script_meta_only(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "profile_step.py"), "architecture=diffusion_gemma_26b_a4b",
           "meta_only=true", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["layers"] == 30 and report["hidden_size"] == 2816 and report["tokens_per_sequence"] == 64 + 32
    assert report["parameters"]["total"] == TOTAL
    estimate = report["estimate"]
    assert estimate["weights_gib"] == pytest.approx(TOTAL * 2 / 1024 ** 3)
    assert estimate["expert_weight_copies_gib"] == 0  # its experts sum linearly: edited at their output, no copies
    assert report["fused_expert_sites"] == {"edited_at_output": 30, "projected_weight_copies": 0}
    assert "training" not in report


def test_training_step_is_measured_on_a_tiny_diffusion_gemma():
    """The benchmark's overhead line on the DiffusionGemma organism: its config nests vocab_size in the text config."""
    from subspace.models.tiny import tiny_diffusion_gemma
    from subspace.profiling.measure import profile_training_step

    model = tiny_diffusion_gemma().model
    assert not hasattr(model.config, "vocab_size")
    report = profile_training_step(family_for(model), batch_size=2, prompt_length=8, rank=2, kl_weight=1.0,
                                   steps=1, warmup=1)
    assert report["step_overhead_ratio"] > 0 and report["edited_sites"] == 6
