"""The real `train.py` entry point on the tiny organism (seconds), through Hydra's compose API and as a process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from subspace.config import register_resolvers
from tests.conftest import REQUIRED, ROOT, run_train


def test_train_py_default_method_writes_the_run_directory(tmp_path, cache_dir, tiny_organism):
    metrics = run_train(tmp_path, cache_dir)
    assert REQUIRED <= metrics.keys()
    assert "select_kl" not in metrics  # a single run leaves the selection split to sweeps (and eval.on_select=true)
    assert metrics["method"] == "subspace" and metrics["n_harmful"] == 6 and metrics["n_harmless"] == 6
    run = tmp_path / "run"
    for path in ("edit.safetensors", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "samples.jsonl", "csv/metrics.csv", "checkpoints/last.ckpt", ".hydra/config.yaml"):
        assert (run / path).exists(), path
    assert len((run / "samples.jsonl").read_text().splitlines()) == 12
    assert "refusal (harmful, n=6)" in metrics["_stdout"]
    card = (run / "adapter" / "README.md").read_text()  # the model card, with the run's own numbers and command
    assert f"base_model: {metrics['model_source']['organism']}" in card and "python train.py model=tiny_organism" in card
    assert f"| harmful prompts refused | {100 * metrics['refusal_rate_before']:.1f}% |" in card


@pytest.mark.parametrize("model", ["tiny_organism", "tiny_llada_organism", "tiny_diffusion_gemma_organism"])
def test_eval_overrides_take_files_and_change_nothing_else(tmp_path, cache_dir, tiny_organism, model):
    harmful, harmless = tmp_path / "h.json", tmp_path / "s.jsonl"
    harmful.write_text(json.dumps([{"instruction": f"Explain how to break into house number {i}."} for i in range(3)]))
    harmless.write_text("\n".join(json.dumps({"instruction": f"Name a fruit that starts with {c}."}) for c in "abcd"))
    metrics = run_train(tmp_path, cache_dir, f"data.eval_harmful={harmful}", f"data.eval_harmless={harmless}",
                        model=model)
    assert REQUIRED <= metrics.keys()
    assert metrics["n_harmful"] == 3 and metrics["n_harmless"] == 4
    assert metrics["data"]["sources"]["eval_harmful"] == str(harmful)
    assert metrics["data"]["train_harmful"]["n"] > 0


def test_prefix_refusal_term_trains_through_train_py(tmp_path, cache_dir, tiny_organism):
    metrics = run_train(tmp_path, cache_dir, "objective.refusal=prefix", "objective.prefix_tokens=2")
    assert metrics["refusal_term"] == "prefix (2 tokens, ≤ 8)"
    prefixes = metrics["refusal_token_ids"]
    assert 1 <= len(prefixes) <= 8 and all(len(p) == 2 for p in prefixes)
    assert REQUIRED <= metrics.keys() and metrics["steps"] > 0


def test_diff_means_scan_writes_scan_table(tmp_path, cache_dir, tiny_organism):
    metrics = run_train(tmp_path, cache_dir, "method=diff_means")
    assert metrics["method"] == "diff_means" and metrics["rank"] == 1
    assert [row["layer"] for row in metrics["scan"]] == [0, 1, 2, 3]
    assert 0 <= metrics["source_layer"] < 4 and (tmp_path / "run" / "scan.csv").exists()


def test_bad_rank_fails_fast_with_the_value(tmp_path, cache_dir, tiny_organism):
    cmd = [sys.executable, str(ROOT / "train.py"), "model=tiny_organism", "debug=fast", "logger=csv",
           f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'run'}", "method.rank=0"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "method.rank=0 must be a positive integer" in result.stderr


@pytest.mark.parametrize("overrides", [[], ["model=smollm2_organism", "method=diff_means", "logger=default"],
                                       ["experiment=smollm2_subspace", "data=builtin"],
                                       ["model=llada", "trainer=gpu"], ["model=llada_organism", "method=diff_means"]])
def test_configs_compose(overrides):
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = "/tmp/x"
    for group in ("model", "method", "data", "objective", "trainer", "logger", "callbacks", "paths"):
        assert group in cfg
    assert cfg.model._target_.startswith("subspace.")


def _compose(*overrides: str):
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def tuned_settings(path):
    """A conf/tuned file's settings, with those of the files its defaults list names."""
    cfg = OmegaConf.load(path)
    base = [tuned_settings(path.parent / f"{name}.yaml") for name in cfg.pop("defaults", [])]
    return OmegaConf.merge(*base, cfg)


@pytest.mark.parametrize("tuned", sorted((ROOT / "conf" / "tuned").glob("*.yaml")), ids=lambda p: p.stem)
def test_tuned_settings_follow_the_model_and_lose_to_the_command_line(tuned):
    model, method = tuned.stem.rsplit("_", 1)
    settings = OmegaConf.to_container(tuned_settings(tuned))
    cfg = _compose(f"model={model}", f"method={method}")
    plain = _compose("model=tiny_organism", f"method={method}")  # a model with no tuned settings
    changed = 0
    for group, values in settings.items():
        for key, value in values.items():
            assert cfg[group][key] == value, f"{tuned.name}: {group}.{key}"
            changed += plain[group][key] != value
    assert changed > 0, f"{tuned.name} sets nothing the defaults do not already set"
    group, key = next((g, k) for g, values in settings.items() for k in values)
    assert _compose(f"model={model}", f"method={method}", f"{group}.{key}=7")[group][key] == 7


def test_multirun_sweeps_rank(tmp_path, cache_dir, tiny_organism):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "train.py"), "--multirun", "method.rank=1,2", "model=tiny_organism",
           "debug=fast", "logger=csv", f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = sorted(json.loads((sweep / str(i) / "metrics.json").read_text())["rank"] for i in (0, 1))
    assert ranks == [1, 2]


@pytest.mark.parametrize("model, method, expected", [("smollm2_organism", "subspace", "conf/tuned/smollm2_organism_subspace.yaml"),
                                                     ("tiny_organism", "subspace", None)])
def test_the_applied_tuned_file_is_named(model, method, expected):
    """metrics.json and the summary name the conf/tuned overlay a run composed (it silently wins over conf/method)."""
    from subspace.pipeline import tuned_overlay
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}", f"method={method}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    assert tuned_overlay() == expected
