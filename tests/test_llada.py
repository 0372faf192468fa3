"""LLaDA: the published checkpoint layout loads strictly, the sampler batches exactly, the family edits and trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from subspace.families import LLaDAFamily, family_for
from subspace.models.llada import LLaDAConfig, LLaDAModelLM
from subspace.models.llada.loading import llada_from_llama, load_llada
from subspace.models.tiny import tiny_llama, tiny_random_causal
from subspace.sampling import MaskedDiffusionSampler
from tests.conftest import ROOT, assert_hooks_match_weight_deltas, random_edit

# The published config.json of GSAI-ML/LLaDA-8B-Instruct, sizes shrunk; every other field as published.
PUBLISHED_CONFIG = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 64,
    "embedding_dropout": 0.0, "embedding_size": 160, "eos_token_id": 126081, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096, "mlp_hidden_size": 96,
    "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None, "n_heads": 4, "n_kv_heads": 4,
    "n_layers": 2, "pad_token_id": 126081, "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-05,
    "rope": True, "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False,
    "transformers_version": "4.46.3", "use_cache": False, "vocab_size": 160, "weight_tying": False,
}
BLOCK_KEYS = ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out")


def published_state_dict(c: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under exactly the published checkpoint's key names and shapes."""
    g = torch.Generator().manual_seed(seed)
    d, f, v = c["d_model"], c["mlp_hidden_size"], c["embedding_size"]
    shapes = {"attn_norm": (d,), "q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "attn_out": (d, d),
              "ff_norm": (d,), "ff_proj": (f, d), "up_proj": (f, d), "ff_out": (d, f)}
    state = {"model.transformer.wte.weight": torch.randn(v, d, generator=g) * 0.02,
             "model.transformer.ln_f.weight": 1 + 0.1 * torch.randn(d, generator=g),
             "model.transformer.ff_out.weight": torch.randn(v, d, generator=g) * 0.02}
    for i in range(c["n_layers"]):
        for name in BLOCK_KEYS:
            shape = shapes[name]
            scale = 0.1 if len(shape) == 1 else 0.05
            offset = 1 if len(shape) == 1 else 0
            state[f"model.transformer.blocks.{i}.{name}.weight"] = offset + scale * torch.randn(*shape, generator=g)
    return state


@pytest.fixture()
def published_dir(tmp_path):
    folder = tmp_path / "llada"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(PUBLISHED_CONFIG))
    save_file(published_state_dict(PUBLISHED_CONFIG), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_published_key_names_load_strictly_and_survive_a_round_trip(published_dir, tmp_path):
    model, info = LLaDAModelLM.from_pretrained(published_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    written = published_state_dict(PUBLISHED_CONFIG)
    model.load_state_dict(written, strict=True)  # the exact key set, nothing more or less
    assert all(torch.equal(model.state_dict()[k], v) for k, v in written.items())
    ids = torch.randint(0, 160, (2, 11))
    logits = model(ids).logits
    model.save_pretrained(tmp_path / "again")
    assert torch.equal(LLaDAModelLM.from_pretrained(tmp_path / "again")(ids).logits, logits)


def test_load_llada_reads_a_local_copy_without_remote_code(published_dir):
    tiny_random_causal().tokenizer.save_pretrained(published_dir)
    bundle = load_llada(pretrained=str(published_dir), dtype="float32", device="cpu",
                        family={"canvas_length": 8, "sampler": {"block_length": 4}})
    assert isinstance(bundle.model, LLaDAModelLM) and bundle.source["pretrained"] == str(published_dir)
    family = family_for(bundle.model, **bundle.family_options)
    assert isinstance(family, LLaDAFamily) and family.mask_id == 126336 and family.canvas_length == 8


def test_unsupported_published_field_values_are_named():
    with pytest.raises(ValueError, match="block_type='sequential'.*valid: \\['llama'\\]"):
        LLaDAConfig(**{**PUBLISHED_CONFIG, "block_type": "sequential"})


def test_converted_llama_equals_the_causal_model_where_attention_cannot_differ():
    """With one layer the last position attends to the same keys causally or not: logits must agree."""
    tok_len = len(tiny_random_causal().tokenizer)
    llama = tiny_llama(tok_len, hidden_size=64, num_layers=1, seed=3)
    llada = llada_from_llama(llama, mask_token_id=5, shift_logits=False)
    ids = torch.randint(3, tok_len, (2, 9))
    assert torch.allclose(llama(ids).logits[:, -1], llada(ids).logits[:, -1], atol=1e-5)
    assert not torch.allclose(llama(ids).logits[:, 0], llada(ids).logits[:, 0], atol=1e-3)  # bidirectional elsewhere
    shifted = llada_from_llama(llama, mask_token_id=5, shift_logits=True)
    assert torch.equal(shifted(ids).logits[:, 1:], llada(ids).logits[:, :-1])
    for model in (llada, shifted):  # the canvas-only head gives the same numbers as slicing the full one
        assert torch.allclose(model(ids, logits_to_keep=4).logits, model(ids).logits[:, -4:], atol=1e-6)


@pytest.fixture()
def tiny_llada():
    """A tiny random LLaDA-class model (float64, so batching cannot flip a near-tie) and the tiny tokenizer."""
    bundle = tiny_random_causal(hidden_size=64, num_layers=2, seed=1)
    tokenizer = bundle.tokenizer
    model = llada_from_llama(bundle.model, mask_token_id=len(tokenizer), vocab_size=len(tokenizer) + 1,
                             shift_logits=False)
    return model.double(), tokenizer


@pytest.mark.parametrize("sampler", [MaskedDiffusionSampler(block_length=4),
                                     MaskedDiffusionSampler(block_length=8, steps=4, cfg_scale=1.0)],
                         ids=["one-token-per-step", "two-per-step-cfg"])
def test_batched_sampling_equals_one_by_one(tiny_llada, sampler):
    model, tokenizer = tiny_llada
    family = LLaDAFamily(model, canvas_length=8, sampler=sampler)
    prompts = ["Hi.", "Name three fruits that are red and sweet.", "How do I boil an egg?", "Why is the sky blue?"]
    batched = family.generate(tokenizer, family.chat_batch(tokenizer, prompts), 8)
    single = torch.cat([family.generate(tokenizer, family.chat_batch(tokenizer, [p]), 8) for p in prompts])
    assert torch.equal(batched, single)
    assert not (batched == family.mask_id).any()


def test_eval_reads_the_canvas_by_default_and_a_causal_model_96_tokens(tiny_llada):
    from subspace.evaluation.evaluator import Evaluator
    from subspace.models.bundle import ModelBundle

    model, tokenizer = tiny_llada
    bundle = ModelBundle(model, tokenizer, "tiny_llada", {})
    assert Evaluator(bundle, LLaDAFamily(model, canvas_length=16)).max_new_tokens == 16  # eval.max_new_tokens=null
    assert Evaluator(bundle, LLaDAFamily(model, canvas_length=16), max_new_tokens=24).max_new_tokens == 24
    causal = tiny_random_causal()
    assert Evaluator(causal, family_for(causal.model)).max_new_tokens == 96


def test_sampler_schedule_rejects_lengths_that_do_not_tile():
    with pytest.raises(ValueError, match="gen_length=10 must be a positive multiple of sampler.block_length=4"):
        MaskedDiffusionSampler(block_length=4).schedule(10)
    with pytest.raises(ValueError, match="sampler.steps=3 must be a multiple of the 2 blocks"):
        MaskedDiffusionSampler(block_length=4, steps=3).schedule(8)
    assert MaskedDiffusionSampler(block_length=4, steps=4).schedule(8) == (2, 2)
    assert MaskedDiffusionSampler(block_length=8, tokens_per_step=2).schedule(8) == (1, 4)  # any canvas length
    assert MaskedDiffusionSampler(block_length=8, tokens_per_step=2).schedule(32) == (4, 4)
    with pytest.raises(ValueError, match="tokens_per_step=3 must be a positive divisor of sampler.block_length=8"):
        MaskedDiffusionSampler(block_length=8, tokens_per_step=3)
    with pytest.raises(ValueError, match="set one of them"):
        MaskedDiffusionSampler(block_length=8, steps=4, tokens_per_step=2)


def test_llada_hooks_and_weight_deltas_give_the_same_logits(tiny_llada):
    model, tokenizer = tiny_llada
    family = family_for(model.float())
    assert isinstance(family, LLaDAFamily)
    assert [s.name for s in family.writer_sites([0])] == ["model.transformer.blocks.0.attn_out",
                                                          "model.transformer.blocks.0.ff_out"]
    assert_hooks_match_weight_deltas(model, random_edit(family, rank=3), len(tokenizer))


def test_llada_peft_adapter_reproduces_the_edited_logits(tiny_llada, tmp_path):
    import copy

    from subspace.export import export_peft_adapter, load_peft_adapter

    model, tokenizer = tiny_llada
    model = model.float()
    edit = random_edit(family_for(model), rank=2, seed=4)
    ids = torch.randint(3, len(tokenizer), (2, 10))
    with edit.applied(model):
        expected = model(ids).logits
    adapted = load_peft_adapter(copy.deepcopy(model), export_peft_adapter(edit, model, tmp_path / "adapter"))
    assert torch.allclose(adapted(input_ids=ids).logits, expected, atol=1e-5)


def test_response_logprobs_read_the_first_canvas_positions(tiny_llada):
    model, tokenizer = tiny_llada
    family = LLaDAFamily(model, canvas_length=8, kl_positions=3)
    batch = family.chat_batch(tokenizer, ["Hi.", "Name three fruits."])
    logprobs = family.response_logprobs(batch)
    assert logprobs.shape == (2, 3, model.config.embedding_size) and logprobs.dtype == torch.float32
    full = model(**family.with_canvas(batch)).logits[:, batch["input_ids"].shape[1]:][:, :3]
    assert torch.allclose(logprobs, torch.log_softmax(full.float(), -1), atol=1e-6)
    assert family.residuals(batch).shape == (2, 2, 64)


def test_model_llada_without_weights_fails_fast_and_says_how_to_get_them(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), "model=llada", f"hydra.run.dir={tmp_path / 'run'}", "logger=csv"]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    for needle in ("GSAI-ML/LLaDA-8B-Instruct", "huggingface-cli download", "16 GB", "model.pretrained=DIR"):
        assert needle in result.stderr, needle


def test_train_py_on_the_tiny_llada_organism_reports_the_same_keys(tmp_path, cache_dir, tiny_organism):
    """The LLaDA organism is built from the cached causal one, edited, and judged through the diffusion sampler."""
    from tests.conftest import REQUIRED, run_train

    metrics = run_train(tmp_path, cache_dir, model="tiny_llada_organism")
    assert REQUIRED <= metrics.keys() and metrics["n_harmful"] == 6
    assert metrics["model_source"]["causal_organism"].startswith(str(cache_dir))
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and all("<|mdm_mask|>" not in s["before"] + s["after"] for s in samples)


def test_snapshots_give_a_curve_of_verdicts_against_steps(tmp_path, cache_dir, tiny_organism):
    """A build with model.snapshot_every saves the model along its (bfloat16-mixed) fine-tune;
    scripts/organism_curve.py judges every snapshot and the finished organism and plots them."""
    out = tmp_path / "curve"
    cmd = [sys.executable, str(ROOT / "scripts" / "organism_curve.py"), "model=tiny_llada_organism",
           "+model.snapshot_every=40", "model.recipe.max_steps=100", "+model.recipe.precision=bf16-mixed",
           f"paths.cache_dir={cache_dir}", f"hydra.run.dir={out}", "eval/judge=three_way_text", "curve.limit=3",
           "organism_sets=select"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (out / "curve.csv").read_text().splitlines()
    assert rows[0].startswith("step,harmful_select_refusal,harmful_select_answer,harmful_select_broken")
    assert [int(r.split(",")[0]) for r in rows[1:]] == [40, 80, 100]
    assert (out / "curve.png").stat().st_size > 0
    responses = [json.loads(line) for line in (out / "curve_responses.jsonl").read_text().splitlines()]
    assert len(responses) == 3 * 3 * 3
    by_step = {s: [r["response"] for r in responses if r["step"] == s] for s in (40, 100)}
    assert by_step[40] != by_step[100]  # the snapshots are other weights, not the finished organism again
