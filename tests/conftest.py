"""Shared fixtures: tiny random models of real transformers classes and a tiny organism, no hub needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from subspace.families import CausalFamily
from subspace.models.tiny import tiny_random_causal
from subspace.organisms.causal import load_causal_organism

ROOT = Path(__file__).resolve().parents[1]
# conf/model/tiny_organism.yaml itself, so the fixture builds the very organism (same cache key) that train.py loads
TINY_ORGANISM = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny_organism.yaml")).items()
                 if k not in ("_target_", "cache_dir")}


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
