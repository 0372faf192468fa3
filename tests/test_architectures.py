"""The architecture matrix: every decoder-only LM class of transformers' causal-LM mapping, as a tiny random model built
from its own default config (shrunk), through every check of `subspace.analysis.coverage`: writers found by structure,
the edit covering what each layer adds to the residual stream, hooks = weights (logits), the PEFT adapter loaded with
plain `peft`, merge/unmerge bit-exact, a difference-of-means and a two-step learned-subspace fit in-process.

`KNOWN` lists the classes that do not pass, each with the reason the table gives (a substring of it): a class that
starts passing, or fails for another reason, fails here, so `docs/architectures.md` (scripts/coverage.py) stays true.
"""

from __future__ import annotations

import pytest
import torch

from subspace.analysis.coverage import CHECKS, check_class
from subspace.families import CausalFamily
from subspace.models.tiny_zoo import EXCLUDED, causal_lm_classes, exclusion, in_scope, tiny_model

TINY_BUILD = "the tiny model does not build or run"
KNOWN = {  # model type → (check that fails, substring of its reason)
    **{t: ("build", TINY_BUILD) for t in (
        "blt", "cohere_compass_text", "dbrx", "dory", "dots1", "dots3_note", "dots3_note_text",
        "falcon_h1", "gemma3n", "gemma3n_text", "gemma4", "gemma4_assistant", "gemma4_text",
        "gemma4_unified", "gemma4_unified_assistant", "gemma4_unified_text", "hrm_text", "qwen4_exp", "qwen4_exp_text",
        "xlstm", "zamba", "zamba2")},
    "deepseek_v4": ("sites", "through BmmBackward"),
    "hunyuan_v1_moe": ("sites", "through GroupedMmBackward"),
    "inkling_text": ("sites", "ConvolutionBackward"),
    "inkling2_text": ("sites", "through ConvolutionBackward"),
    "inkling2_loop_text": ("sites", "through ConvolutionBackward"),
    "rwkv": ("sites", "RwkvForCausalLM (rwkv) layer 0 (rwkv.blocks.0) adds to the residual stream through MulBackward "
                      "of two activations"),
    "jetmoe": ("sites", "several stacked-expert writers"),
    "axk1": ("residual", "a residual writer was missed"),
    "gpt_neox_japanese": ("residual", "a residual writer was missed"),
    "longcat_flash": ("residual", "a residual writer was missed"),
    "laguna": ("peft", "the loaded adapter's logits differ"),
    "hy_v4": ("diff_means", "mat1 and mat2 shapes cannot be multiplied"),
}
MUST_PASS = ("gpt_oss", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next", "gemma2", "gemma3",
             "gemma3_text", "phi3", "gpt2", "gpt_neox", "gptj", "falcon", "deepseek_v3", "llama4", "llama4_text", "opt",
             "granitemoehybrid", "llama", "mixtral", "qwen3_moe", "mamba", "mamba2", "bloom", "mpt", "biogpt", "phi",
             "codegen", "persimmon", "xglm", "nemotron_h", "cohere")


@pytest.fixture(autouse=True)
def _quiet_and_single_threaded(monkeypatch):
    """Tiny models are all small operations: one thread is several times faster than two fighting over 2 cores."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("model_type", sorted(in_scope()))
def test_class_passes_every_check_or_fails_as_the_table_says(model_type, tmp_path):
    report = check_class(model_type, tmp_path)
    if model_type in KNOWN:
        check, reason = KNOWN[model_type]
        assert not report.passed, f"{model_type} now passes every check: remove it from KNOWN"
        assert report.failure is not None and report.failure.startswith(f"{check}:") and reason in report.failure, \
            report.failure
    else:
        assert report.passed, f"{model_type}: {report.failure}"
        assert set(report.results) == set(CHECKS)


def test_the_classes_the_issue_names_pass_and_enough_pass_overall():
    scope = in_scope()
    assert not set(MUST_PASS) & set(KNOWN) and set(MUST_PASS) <= set(scope)
    assert len(set(scope) - set(KNOWN)) >= 55


def test_scope_rule():
    """Encoders and encoder–decoder halves, audio models and the listed others are out; every other class is in."""
    classes = causal_lm_classes()
    assert exclusion("bert").startswith("an encoder model") and exclusion("marian").startswith("an encoder–decoder")
    assert exclusion("whisper").startswith("an audio model") and exclusion("musicgen").startswith("an audio model")
    assert all(exclusion(t) == reason for t, reason in EXCLUDED.items())
    assert set(in_scope()) == {t for t in classes if exclusion(t) is None}
    assert {"gpt2", "llama", "gpt_oss", "mamba", "rwkv", "gemma3"} <= set(in_scope())


def test_unsupported_class_is_refused_naming_the_class_and_what_is_missing():
    model = tiny_model("rwkv")
    with pytest.raises(TypeError, match=r"RwkvForCausalLM \(rwkv\) layer 0 .* no weight edit of a residual writer "
                                        r"covers; this architecture is not supported"):
        CausalFamily(model).writer_sites()


def test_post_norm_writers_say_which_norm_follows_them():
    model = tiny_model("gemma2")
    sites = CausalFamily(model).writer_sites(layers=[0])
    assert [(s.name, s.after) for s in sites] == [
        ("model.layers.0.self_attn.o_proj", "post_attention_layernorm"),
        ("model.layers.0.mlp.down_proj", "post_feedforward_layernorm")]
    family = CausalFamily(model)
    assert family.residual_entry(sites[0]) == "model.layers.0.post_attention_layernorm"


def test_multimodal_wrapper_edits_the_language_model_only():
    model = tiny_model("gemma3")
    family = CausalFamily(model)
    assert family.layers_path == "model.language_model.layers"
    assert all(s.name.startswith("model.language_model.layers.") for s in family.writer_sites())
