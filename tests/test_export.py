"""The exported PEFT adapter and merged model reproduce the edited model."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM

from subspace.data.loading import load_prompts
from subspace.evaluation.generation import generate_responses
from subspace.export.peft_adapter import export_peft_adapter, load_peft_adapter, save_merged_model
from subspace.families import CausalFamily
from tests.conftest import random_edit


def test_peft_adapter_reproduces_greedy_generations_token_for_token(tmp_path, tiny_organism):
    bundle = tiny_organism
    family = CausalFamily(bundle.model)
    edit = random_edit(family, rank=4, seed=1, strength=1.0)
    prompts = load_prompts("builtin:harmful_heldout", limit=6) + load_prompts("builtin:harmless_heldout", limit=6)
    with edit.applied(bundle.model):
        expected = generate_responses(family, bundle.tokenizer, prompts, max_new_tokens=16, progress=False)
    unedited = generate_responses(family, bundle.tokenizer, prompts, max_new_tokens=16, progress=False)
    assert expected != unedited  # the edit changes generations, so reproducing them means something

    adapter_dir = export_peft_adapter(edit, bundle.model, tmp_path / "adapter")
    peft_model = load_peft_adapter(copy.deepcopy(bundle.model), adapter_dir).eval()
    got = generate_responses(CausalFamily(peft_model.base_model.model), bundle.tokenizer, prompts,
                             max_new_tokens=16, progress=False)
    assert got == expected


def test_merged_model_loads_with_plain_transformers_and_matches_hooks(tmp_path, tiny):
    family = CausalFamily(tiny.model)
    edit = random_edit(family, rank=2, seed=2)
    ids = torch.randint(3, len(tiny.tokenizer), (2, 10))
    with edit.applied(tiny.model):
        expected = tiny.model(ids).logits
    original = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    save_merged_model(edit, tiny.model, tiny.tokenizer, tmp_path / "merged")
    assert all(torch.equal(v, original[k]) for k, v in tiny.model.state_dict().items())  # loaded model untouched
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(reloaded(ids).logits, expected, atol=1e-5)
