"""Shared fixtures: tiny random models of real transformers classes and a tiny organism, no hub needed; and the
helpers more than one test module uses (test modules import them from here, never from one another)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from torch import Tensor, nn

from subspace.config import register_resolvers
from subspace.data.datamodule import PairedPromptDataModule
from subspace.families import CausalFamily
from subspace.interventions.edit import ProjectionEdit
from subspace.interventions.projection import orthonormalize
from subspace.models.tiny import tiny_random_causal, tiny_tokenizer
from subspace.organisms.causal import load_causal_organism
from subspace.training.subspace_module import LearnedSubspace, SubspaceModule

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


# --- one torch thread for a module: pytestmark = pytest.mark.usefixtures("one_thread") -----------------------------


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread here and in every train.py this module starts: on the loaded 2-core machine, two
    contending threads make these tiny runs ~10× slower. Bitwise comparisons are between runs alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


# --- random projection edits ---------------------------------------------------------------------------------------


def random_edit(family, rank: int, seed: int = 0, strength: float | None = None) -> ProjectionEdit:
    g = torch.Generator().manual_seed(seed)
    sites = [s.name for s in family.writer_sites()]
    bases = orthonormalize(torch.randn(len(sites), family.hidden_size, rank, generator=g))
    strengths = torch.rand(len(sites), generator=g) if strength is None else torch.full((len(sites),), strength)
    return ProjectionEdit(sites, bases, strengths)


def assert_hooks_match_weight_deltas(model, edit: ProjectionEdit, vocab_size: int) -> None:
    """Activation form (hooks on writer outputs) ≡ weight form W + BA, which holds on pre-norm blocks."""
    ids = torch.randint(3, vocab_size, (2, 12))
    original = model(ids).logits
    with edit.applied(model):
        hooked = model(ids).logits
    assert (hooked - original).abs().max() > 1e-3  # the edit does something
    with torch.no_grad():
        for site, (a, b) in edit.lora_factors(model).items():
            model.get_submodule(site).weight += b @ a
    assert torch.allclose(hooked, model(ids).logits, atol=1e-5)


# --- composed configs ----------------------------------------------------------------------------------------------


def compose_config(*overrides: str, hydra_node: bool = False):
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_node)


def compose_model(name: str, cache_dir) -> OmegaConf:
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"model={name}", f"paths.cache_dir={cache_dir}"]).model


def architecture(name: str) -> dict:
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="profile", overrides=[f"architecture={name}"])
    return OmegaConf.to_container(cfg.architecture, resolve=True)


# --- scripts run as a user runs them -------------------------------------------------------------------------------


REQUIRED = {"refusal_rate_before", "refusal_rate_after", "harmless_refusal_rate_before",
            "harmless_refusal_rate_after", "kl", "n_harmful", "n_harmless"}


def run_train(tmp_path, cache_dir, *overrides: str, model: str = "tiny_organism") -> dict:
    """Run train.py as a user would; return metrics.json."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), f"model={model}", "debug=fast", "logger=csv",
           f"paths.cache_dir={cache_dir}", f"hydra.run.dir={out}", *overrides]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text()) | {"_stdout": result.stdout}


VAL_SETS = ("harmful_val", "harmless_val", "lookalike_heldout")


def run_evaluate_organism(tmp_path, cache_dir, model: str, sets: tuple[str, ...] = VAL_SETS,
                          *overrides: str) -> None:
    """scripts/evaluate_organism.py on 3 prompts of each set, as a user runs it, writing into tmp_path."""
    limits = [f"sets.{name}.limit=3" for name in sets]
    cmd = [sys.executable, str(ROOT / "scripts" / "evaluate_organism.py"), f"model={model}",
           f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path}", "eval.max_new_tokens=4", "eval/judge=three_way_text",
           *limits, *overrides]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


# --- Lightning fits on a toy module and on the tiny random model ---------------------------------------------------


class RecordBatches(L.LightningModule):
    """Records the batches it trains on; one parameter so that there is an optimiser step."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((tuple(batch["a"]), tuple(batch["b"])))
        return (self.w - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def quiet_trainer(steps: int, ckpt_dir: Path, callbacks: tuple = ()) -> L.Trainer:
    """Checkpoints (last.ckpt) after every step."""
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=1, save_top_k=0)
    return L.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=[checkpoint, *callbacks], default_root_dir=ckpt_dir)


def fit_toy(loader, steps: int, ckpt_dir: Path, resume: bool = False) -> list[tuple]:
    module = RecordBatches()
    quiet_trainer(steps, ckpt_dir).fit(module, loader, ckpt_path=ckpt_dir / "last.ckpt" if resume else None)
    return module.seen


def tiny_fit(tiny, tmp_path: Path, steps: int, callbacks: tuple = (), refusal_ids: tuple[int, ...] = (5, 7),
             resume: bool = False, kl_top_k: int | None = None) -> tuple[SubspaceModule, L.Trainer]:
    """A few steps of the real module and datamodule on the tiny random model, checkpointing every step."""
    family = CausalFamily(tiny.model)
    prompts = [f"Tell me about topic number {i}." for i in range(8)]
    data = PairedPromptDataModule(tiny.tokenizer, family, prompts[:4], prompts[4:], batch_size=2)
    sites = family.writer_sites()
    layers = sorted({s.layer for s in sites})
    init = torch.randn(len(layers), family.hidden_size, 2, generator=torch.Generator().manual_seed(0))
    subspace = LearnedSubspace(init, [layers.index(s.layer) for s in sites], learn_strength=True)
    module = SubspaceModule(family, [s.name for s in sites], subspace, torch.tensor(refusal_ids),
                            data.harmless_batches(), kl_top_k=kl_top_k)
    trainer = quiet_trainer(steps, tmp_path / "checkpoints", callbacks=callbacks)
    with module.hooks:
        trainer.fit(module, datamodule=data, ckpt_path=tmp_path / "checkpoints" / "last.ckpt" if resume else None)
    return module, trainer


# --- tiny random mixture-of-experts models -------------------------------------------------------------------------


HIDDEN, EXPERTS, TOP_K, LAYERS = 64, 16, 2, 3  # 16 experts: a short calibration prompt leaves some unfired
KINDS = ("qwen3_moe", "olmoe", "mixtral", "qwen2_moe")


def tiny_moe(kind: str, seed: int = 0) -> nn.Module:
    """A tiny random MoE causal LM; Qwen3-MoE's first layer is dense (mlp_only_layers), to check it stays so."""
    from transformers import (MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig,
                              Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

    tok = tiny_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=TOP_K, max_position_embeddings=256,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(seed)
    if kind == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, head_dim=16, intermediate_size=96,
                                                   moe_intermediate_size=32, num_experts=EXPERTS, mlp_only_layers=[0]))
    elif kind == "olmoe":
        model = OlmoeForCausalLM(OlmoeConfig(**common, intermediate_size=32, num_experts=EXPERTS))
    elif kind == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**common, intermediate_size=32, num_local_experts=EXPERTS))
    else:
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**common, intermediate_size=96, moe_intermediate_size=32,
                                                   shared_expert_intermediate_size=32, num_experts=EXPERTS))
    return model.float().eval().requires_grad_(False)


def moe_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    return [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def token_ids(n: int = 10, batch: int = 2) -> Tensor:
    return torch.randint(3, len(tiny_tokenizer()), (batch, n), generator=torch.Generator().manual_seed(5))
