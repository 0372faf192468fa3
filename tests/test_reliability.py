"""Reliability: exact resume, bitwise reproducibility, numeric guards, and a base model no run changes."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Callable

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import CombinedLoader
from omegaconf import open_dict
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from subspace import pipeline
from subspace.config import register_resolvers
from subspace.data.datamodule import PairedBatches, ResumableShuffle
from subspace.evaluation import evaluator as evaluator_module
from subspace.families import CausalFamily
from subspace.objectives.losses import kl_divergence, refusal_loss
from subspace.pipeline import resume_checkpoint
from subspace.training.subspace_module import SubspaceModule
from subspace.utils.digest import tensor_digest
from tests.conftest import ROOT, fit_toy, run_train, tiny_fit

# differ between two runs of the same edit by design
RUN_SPECIFIC = {"wall_time_s", "fit_seconds", "run_dir", "config", "resumed_from", "_stdout"}

# one torch thread here and in every train.py this module starts (the one_thread fixture in tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


# --- the resumable data order, on a toy module (no model) -------------------------------------------------


def paired(sizes: tuple[int, int], batch_size: int) -> PairedBatches:
    streams = {"a": ResumableShuffle(sizes[0], batch_size, 0), "b": ResumableShuffle(sizes[1], batch_size, 1)}
    return PairedBatches(streams, lambda name, indices: indices)


@pytest.mark.parametrize("sizes, batch_size", [((5, 3), 2), ((4, 4), 4)])
def test_data_order_resumes_exactly_from_any_step(tmp_path, sizes, batch_size):
    """Mid-epoch, at epoch ends, twice in a row: a resumed fit sees the batches the uninterrupted one saw,
    which are those of the plain shuffled DataLoaders the order came from (so earlier runs reproduce)."""
    steps = 6
    full = fit_toy(paired(sizes, batch_size), steps, tmp_path / "full")
    plain = {name: DataLoader(range(n), batch_size=batch_size, shuffle=True, collate_fn=list,
                              generator=torch.Generator().manual_seed(seed))
             for name, n, seed in (("a", sizes[0], 0), ("b", sizes[1], 1))}
    assert fit_toy(CombinedLoader(plain, mode="max_size_cycle"), steps, tmp_path / "plain") == full
    for stop in range(1, steps):
        ckpt_dir = tmp_path / f"stop{stop}"
        seen = fit_toy(paired(sizes, batch_size), stop, ckpt_dir)
        assert seen + fit_toy(paired(sizes, batch_size), steps, ckpt_dir, resume=True) == full, f"resumed at {stop}"
    ckpt_dir = tmp_path / "twice"
    seen = [b for n in (2, 4) for b in fit_toy(paired(sizes, batch_size), n, ckpt_dir, resume=n > 2)]
    assert seen + fit_toy(paired(sizes, batch_size), steps, ckpt_dir, resume=True) == full


def test_resume_last_without_a_checkpoint_names_the_directory_and_how_to_resume(tmp_path):
    callback = ModelCheckpoint(dirpath=tmp_path / "checkpoints")
    where = re.escape(f"no last.ckpt in {tmp_path / 'checkpoints'}. Resume an interrupted run with `python train.py "
                      "ckpt_path=last hydra.run.dir=RUN_DIR`")
    with pytest.raises(FileNotFoundError, match=where):
        resume_checkpoint("last", [callback])
    with pytest.raises(FileNotFoundError, match="model_checkpoint callback is off"):
        resume_checkpoint("last", [])
    with pytest.raises(FileNotFoundError, match="ckpt_path=nowhere.ckpt is not a checkpoint file"):
        resume_checkpoint("nowhere.ckpt", [callback])
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").touch()
    assert resume_checkpoint("last", [callback]) == str(tmp_path / "checkpoints" / "last.ckpt")
    assert resume_checkpoint(None, [callback]) is None


# --- numeric guards, on the SubspaceModule with a tiny random model ---------------------------------------


class AtStep(L.Callback):
    """Does `action(module)` just before the training step `step` runs."""

    def __init__(self, step: int, action: Callable[[SubspaceModule], None]):
        self.step, self.action = step, action

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.action(pl_module)


def poison_refusal_gradient(module: SubspaceModule) -> None:
    """The step's first log-probabilities (the harmful batch: the refusal term) get a NaN gradient."""
    family, original = module.family, module.family.response_logprobs

    def once(batch):
        family.response_logprobs = original
        out = original(batch)
        out.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        return out

    family.response_logprobs = once


def checkpoint_step(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


def test_terms_are_float32_and_finite_for_a_bfloat16_model(tiny, tmp_path):
    tiny.model.to(torch.bfloat16)
    family = CausalFamily(tiny.model)
    batch = family.chat_batch(tiny.tokenizer, ["Name a colour.", "Count to three."])
    logprobs = family.response_logprobs(batch)
    assert logprobs.dtype == torch.float32 and torch.isfinite(logprobs).all()
    for term in (refusal_loss(logprobs[:, 0], torch.tensor([5, 7])), kl_divergence(logprobs, logprobs + 0.1)):
        assert term.dtype == torch.float32 and torch.isfinite(term)
    module, trainer = tiny_fit(tiny, tmp_path, steps=2)  # the guards would raise on a non-finite loss or gradient
    for name in ("train/refusal", "train/kl"):
        assert trainer.callback_metrics[name].dtype == torch.float32 and torch.isfinite(trainer.callback_metrics[name])
    assert module.subspace.raw.dtype == torch.float32 and torch.isfinite(module.subspace.raw).all()


@pytest.mark.parametrize("poison, message", [
    (lambda m: m.reference.logprobs.fill_(float("nan")), "non-finite loss at step 2: the kl term"),
    (lambda m: m.subspace.raw.register_hook(lambda g: g * float("nan")),
     "non-finite gradient at step 2 in subspace.raw: the gradients at both terms' log-probabilities are finite"),
    (poison_refusal_gradient, "non-finite gradient at step 2 in subspace.raw, subspace.strength_logits: it is "
                              "already non-finite at the log-probabilities of the refusal term"),
], ids=["loss", "gradient", "gradient-of-a-term"])
def test_a_nonfinite_step_stops_the_run_and_keeps_the_last_good_checkpoint(tiny, tmp_path, poison, message):
    with pytest.raises(FloatingPointError, match=message):
        tiny_fit(tiny, tmp_path, steps=4, callbacks=(AtStep(2, poison),))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert checkpoint_step(last) == 2
    assert all(torch.isfinite(t).all() for t in torch.load(last, weights_only=True)["state_dict"].values())


def test_resuming_against_a_changed_model_or_refusal_probe_is_refused(tiny, tmp_path):
    """The original distributions and refusal tokens are recomputed on resume; if the model or the prompts
    changed, they no longer match what the checkpoint was trained against."""
    tiny_fit(tiny, tmp_path, steps=2)
    with pytest.raises(ValueError, match=r"refusal tokens \[5, 7\], this run probed \[5, 8\]"):
        tiny_fit(tiny, tmp_path, steps=3, refusal_ids=(5, 8), resume=True)
    with torch.no_grad():
        tiny.model.get_input_embeddings().weight.mul_(1.5)
    with pytest.raises(ValueError, match="original harmless distributions with digest [0-9a-f]+, this run computed"):
        tiny_fit(tiny, tmp_path, steps=3, resume=True)


# --- whole runs of train.py on the tiny organism ---------------------------------------------------------


RESUME = ("method.batch_size=6",)  # 16 prompts a class: 3 steps an epoch, so step 4 is mid-epoch
STEPS, STOP = 7, 4


def edit_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "run" / "edit.safetensors")


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in RUN_SPECIFIC}


def train(base: Path, cache_dir: Path, *overrides: str) -> dict:
    base.mkdir(parents=True, exist_ok=True)
    return run_train(base, cache_dir, *RESUME, *overrides)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir) -> tuple[Path, dict]:
    """STEPS steps in one go; its first run builds model=tiny_organism into the session cache (the `tiny_organism`
    fixture's recipe differs from conf/model/tiny_organism.yaml, so it would build a second organism)."""
    base = tmp_path_factory.mktemp("uninterrupted")
    return base, train(base, cache_dir, f"trainer.max_steps={STEPS}")


def test_a_resumed_run_ends_bitwise_where_an_uninterrupted_one_does(tmp_path, cache_dir, uninterrupted):
    every = f"callbacks.model_checkpoint.every_n_train_steps={STOP}"
    train(tmp_path, cache_dir, f"trainer.max_steps={STOP}", every)
    resumed = train(tmp_path, cache_dir, f"trainer.max_steps={STEPS}", every, "ckpt_path=last")
    base, metrics = uninterrupted
    assert resumed["resumed_from"] == str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    expected, got = edit_tensors(base), edit_tensors(tmp_path)
    assert all(torch.equal(expected[k], got[k]) for k in ("bases", "strengths"))
    assert comparable(resumed) == comparable(metrics)
    assert (tmp_path / "run" / "samples.jsonl").read_text() == (base / "run" / "samples.jsonl").read_text()


def test_identical_runs_give_identical_bits_and_record_what_they_depend_on(tmp_path, cache_dir, uninterrupted):
    again = train(tmp_path, cache_dir, f"trainer.max_steps={STEPS}")
    base, metrics = uninterrupted
    expected, got = edit_tensors(base), edit_tensors(tmp_path)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert comparable(again) == comparable(metrics)
    assert (tmp_path / "run" / "samples.jsonl").read_text() == (base / "run" / "samples.jsonl").read_text()
    config = again["config"]  # the resolved config, every interpolation filled in
    assert config["seed"] == again["seed"] == 0 and config["trainer"]["max_steps"] == STEPS
    assert config["method"]["batch_size"] == 6 and config["paths"]["output_dir"] == str(tmp_path / "run")
    assert {"torch", "transformers", "lightning", "peft", "python"} <= again["versions"].keys()
    assert again["model_source"]["organism_key"] and Path(again["model_source"]["organism"]).is_dir()
    assert all(again["data"][k]["sha256"] for k in ("train_harmful", "train_harmless", "eval_harmful"))
    assert len(again["git_commit"]) == 40 and isinstance(again["git_dirty"], bool)
    assert again["resumed_from"] is None


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def weight_hashes(model: torch.nn.Module) -> dict[str, str]:
    return {name: tensor_digest(t) for name, t in model.state_dict().items()}


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=torch.arange(1, 9).unsqueeze(0)).logits


def test_a_run_leaves_the_base_model_untouched_on_disk_and_in_memory(tmp_path, cache_dir, uninterrupted,
                                                                     monkeypatch):
    folder = Path(uninterrupted[1]["model_source"]["organism"])  # model=tiny_organism's, built by that run
    on_disk = file_hashes(folder)
    loaded, original_family_for = {}, evaluator_module.family_for

    def family_for(model, *args, **options):  # sees the run's own model right after loading
        loaded.update(model=model, hashes=weight_hashes(model), logits=logits(model))
        return original_family_for(model, *args, **options)

    monkeypatch.setattr(evaluator_module, "family_for", family_for)  # build_evaluator finds the family
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny_organism", "debug=fast", "logger=csv", "export_merged=true",
                                           f"paths.cache_dir={cache_dir}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    metrics = pipeline.run(cfg)
    assert metrics["model_source"]["organism"] == str(folder) and (tmp_path / "run" / "merged").is_dir()
    assert file_hashes(folder) == on_disk
    assert weight_hashes(loaded["model"]) == loaded["hashes"]
    assert torch.equal(logits(loaded["model"]), loaded["logits"])  # and no hook of the edit is left on it


def test_gradient_checkpointing_trains_the_same_edit(tmp_path, cache_dir, uninterrupted):
    """method.gradient_checkpointing=true recomputes each layer in backward; the run ends with the same subspace
    (up to float rounding: the recomputed forward is the same arithmetic, the order of gradient sums may differ)."""
    checkpointed = train(tmp_path, cache_dir, f"trainer.max_steps={STEPS}", "method.gradient_checkpointing=true")
    base, metrics = uninterrupted
    expected, got = edit_tensors(base), edit_tensors(tmp_path)
    torch.testing.assert_close(got["bases"], expected["bases"], rtol=1e-4, atol=1e-5)
    assert checkpointed["config"]["method"]["gradient_checkpointing"] is True
    assert checkpointed["refusal_rate_after"] == metrics["refusal_rate_after"]
