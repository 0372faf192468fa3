"""Shared fixtures: tiny random models of real transformers classes and a tiny organism, no hub needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from subspace.families import CausalFamily
from subspace.models.organism import load_causal_organism
from subspace.models.tiny import tiny_random_causal

ROOT = Path(__file__).resolve().parents[1]
TINY_ORGANISM = dict(
    name="tiny_organism", base="tiny_random", base_kwargs={"hidden_size": 64, "num_layers": 4, "seed": 0},
    recipe={"answer_max_new_tokens": 8, "lora_r": 16, "lora_alpha": 32,
            "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "lr": 3e-3, "batch_size": 16, "max_steps": 120, "seed": 0},
)


@pytest.fixture(autouse=True)
def _seed_every_test():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture()
def tiny():
    """A fresh tiny random LlamaForCausalLM (pre-norm, tied embeddings) and its tokenizer."""
    return tiny_random_causal(hidden_size=32, num_layers=3, seed=0)


@pytest.fixture(scope="session")
def tiny_organism(cache_dir):
    """The tiny organism, built once per session with the real organism code path."""
    return load_causal_organism(cache_dir=str(cache_dir), **TINY_ORGANISM)


@pytest.fixture()
def family(tiny) -> CausalFamily:
    return CausalFamily(tiny.model)
