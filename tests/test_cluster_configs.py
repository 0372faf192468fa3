"""Cluster configs: the trainer strategies (trainer=ddp|fsdp|deepspeed) and the SLURM launcher preset
(hydra/launcher=slurm_gpu) compose, and build what can be built without GPUs or a cluster; one tiny-organism run
with trainer=ddp on 2 CPU processes checks the distributed path end to end.

What is built here: the DDP Trainer on CPU (gloo), the FSDP strategy object and its wrap policy (Lightning builds an
FSDP Trainer only with CUDA), and the submitit launcher down to its sbatch script (no `sbatch` is run). DeepSpeed is
composed only: Lightning refuses to build DeepSpeedStrategy without the `deepspeed` package, which no extra installs.
How the ranks share the batches out is tested without processes in tests/test_data_sharding.py.
"""

from __future__ import annotations

from importlib.util import find_spec

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch.distributed.fsdp import ShardingStrategy
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from subspace.config import register_resolvers
from subspace.families import CausalFamily
from subspace.models.llada.loading import llada_from_llama
from subspace.models.llada.modeling import LLaDABlock
from subspace.training.subspace_module import LearnedSubspace, SubspaceModule
from tests.conftest import ROOT

STRATEGIES = {"ddp": "DDPStrategy", "fsdp": "FSDPStrategy", "deepspeed": "DeepSpeedStrategy"}


def compose_config(*overrides: str, hydra_node: bool = False):
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_node)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_configs_compose_on_top_of_gpu(name):
    gpu = compose_config("trainer=gpu").trainer
    cfg = compose_config(f"trainer={name}", "trainer.devices=8", "trainer.num_nodes=2", "model=llada")
    trainer = cfg.trainer
    assert trainer._target_ == "lightning.pytorch.Trainer"
    assert trainer.strategy._target_ == f"lightning.pytorch.strategies.{STRATEGIES[name]}"
    assert trainer.devices == 8 and trainer.num_nodes == 2  # overridable
    assert trainer.accelerator == "gpu" and trainer.deterministic is False
    assert trainer.precision == "32-true"  # the subspace maths stay float32, as with trainer=gpu
    for key in ("max_steps", "max_epochs", "log_every_n_steps", "limit_val_batches", "num_sanity_val_steps"):
        assert trainer[key] == gpu[key], key  # inherited, so debug=fast and the sweeps still reach them
    assert compose_config(f"trainer={name}", "debug=fast").trainer.max_steps == 3


def test_ddp_config_and_trainer_on_cpu(tmp_path):
    strategy = compose_config("trainer=ddp").trainer.strategy
    assert strategy.find_unused_parameters is False
    cfg = compose_config("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.num_nodes=2")
    # as subspace.pipeline.run builds it; nothing is launched until fit
    trainer = instantiate(cfg.trainer, callbacks=[], logger=False, default_root_dir=str(tmp_path))
    assert isinstance(trainer, L.Trainer) and isinstance(trainer.strategy, DDPStrategy)
    assert trainer.strategy._ddp_kwargs == {"find_unused_parameters": False}
    assert trainer.num_devices == 2 and trainer.num_nodes == 2 and trainer.world_size == 4
    assert trainer.max_steps == 90 and trainer.precision == "32-true"


def test_fsdp_strategy_builds_and_wraps_decoder_layers(tiny):
    cfg = compose_config("trainer=fsdp").trainer.strategy
    strategy = instantiate(cfg)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD and strategy._state_dict_type == "full"
    assert strategy.kwargs["use_orig_params"] is True
    policy = strategy.kwargs["auto_wrap_policy"]
    assert {LlamaDecoderLayer, LLaDABlock} <= set(policy._module_classes)
    # the policy picks exactly the decoder layers of real models of both families (and the root)
    llada = llada_from_llama(tiny.model, mask_token_id=5)
    for model, layer in ((tiny.model, LlamaDecoderLayer), (llada, LLaDABlock)):
        wrapped = set(policy._run_policy(model, set(), {})) - {model}
        assert wrapped and all(isinstance(m, layer) for m in wrapped)
        assert len(wrapped) == sum(isinstance(m, layer) for m in model.modules()) == 3


def test_subspace_module_holds_no_decoder_layer(tiny):
    """fsdp.yaml and deepspeed.yaml say they shard only the subspace today, because SubspaceModule keeps the frozen
    model outside its submodules. If this fails, the model became a submodule: update those comments."""
    family = CausalFamily(tiny.model)
    sites = family.writer_sites()
    layers = sorted({s.layer for s in sites})
    subspace = LearnedSubspace(torch.randn(len(layers), family.hidden_size, 2), [layers.index(s.layer) for s in sites])
    module = SubspaceModule(family, [s.name for s in sites], subspace, torch.tensor([5]))
    assert [name for name, _ in module.named_parameters()] == ["subspace.raw", "subspace.strength_logits"]
    assert not any(isinstance(m, LlamaDecoderLayer) for m in module.modules())


def test_deepspeed_config_is_stage_3():
    strategy = compose_config("trainer=deepspeed").trainer.strategy
    assert strategy.stage == 3
    assert set(strategy) == {"_target_", "stage"}  # offload options are comments: ZeRO-3 on the GPUs only
    if find_spec("deepspeed") is None:
        return  # DeepSpeedStrategy raises without the package, so it is composed only
    built = instantiate(strategy)
    assert built.zero_stage_3


# --- hydra/launcher=slurm_gpu (hydra-submitit-launcher, the `cluster` extra) -------------------------------------


@pytest.fixture()
def submitit_plugin():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[cluster]'")
    return pytest.importorskip("submitit")


def launcher_config(tmp_path, *overrides: str):
    cfg = compose_config("hydra.mode=MULTIRUN", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides, hydra_node=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.mark.parametrize("preset", ["slurm_gpu", "submitit_slurm"])
def test_slurm_launcher_composes(tmp_path, submitit_plugin, preset):
    cfg = launcher_config(tmp_path, f"hydra/launcher={preset}")
    assert cfg.hydra.mode == RunMode.MULTIRUN
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.submitit_folder == f"{tmp_path / 'sweep'}/.submitit/%j"
    assert cfg.hydra.callbacks.pareto_front.objectives == cfg.optimized_metrics  # sweeps still report the front
    if preset == "slurm_gpu":
        assert launcher.partition is None and launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
        assert (launcher.nodes, launcher.timeout_min, launcher.mem_gb, launcher.cpus_per_task) == (1, 180, 64, 8)
        assert launcher.array_parallelism == 8 and launcher.max_num_timeout == 0


def test_slurm_gpu_writes_the_sbatch_script(tmp_path, submitit_plugin, monkeypatch):
    """The preset through the real plugin, up to the sbatch script: one task per GPU (what Lightning's SLURM
    environment expects), every key accepted by submitit. Nothing is submitted."""
    from submitit.slurm.slurm import SlurmExecutor

    cfg = launcher_config(tmp_path, "hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu",
                          "hydra.launcher.gpus_per_node=4", "hydra.launcher.nodes=2", "trainer=ddp",
                          "trainer.devices=4", "trainer.num_nodes=2", "model=llada")
    assert cfg.hydra.launcher.tasks_per_node == 4  # follows gpus_per_node
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    submitted = {}

    def map_array(executor, fn, *args):
        submitted.update(executor=executor, overrides=args[0])
        return []

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # as if srun were on the PATH
    monkeypatch.setattr(submitit_plugin.AutoExecutor, "map_array", map_array)
    assert launcher.launch([["method.rank=2"], ["method.rank=4"]], initial_job_idx=0) == []
    assert submitted["overrides"] == (["method.rank=2"], ["method.rank=4"])
    script = submitted["executor"]._executor._make_submission_file_text("python -u -m x", "uid")
    for line in ("--partition=gpu", "--gpus-per-node=4", "--ntasks-per-node=4", "--nodes=2", "--time=180",
                 "--mem=64GB", "--cpus-per-task=8"):
        assert f"#SBATCH {line}\n" in script, line
    assert submitted["executor"]._executor.parameters["array_parallelism"] == 8


def test_ddp_on_two_cpu_processes_shards_the_batches_and_only_rank_zero_writes(tmp_path, cache_dir, tiny_organism):
    """`trainer=ddp` with gloo on 2 CPU processes: the run completes, rank 1 stops after fitting (one process
    evaluates and writes the run directory), and each rank trains on its own shard of the prompts. With 16 prompts
    per class, a step of 2 ranks at batch size 8 sees all 32, as one process at batch size 16 does: the edits agree
    up to float rounding (DDP averages two 8-prompt means, one process takes one 16-prompt mean), and differ from a
    one-process run at batch size 8 (what every rank trained on before the batches were sharded)."""
    from safetensors.torch import load_file

    from tests.test_train import run_train

    runs = {"b16": ["method.batch_size=16"], "b8": ["method.batch_size=8"],
            "ddp": ["method.batch_size=8", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                    "trainer.precision=32-true"]}
    # settings of its own, so that the measured gaps below do not move with the defaults
    pinned = ["method.lr=2.64e-2", "objective.kl_weight=2.83", "method.min_depth=0.072"]
    metrics, bases = {}, {}
    for name, overrides in runs.items():
        (tmp_path / name).mkdir()
        metrics[name] = run_train(tmp_path / name, cache_dir, *pinned, *overrides)
        bases[name] = load_file(str(tmp_path / name / "run" / "edit.safetensors"))["bases"]
        assert metrics[name]["data"]["train_harmful"]["n"] == metrics[name]["data"]["train_harmless"]["n"] == 16
        assert metrics[name]["steps"] == 3
    ddp, single = metrics["ddp"], metrics["b16"]
    # rounding, not data: Adam's first steps are ≈ lr·sign(g), so gradient entries near 0 turn rounding into ~1e-4
    # (measured: 1.6e-4 from batch 16, 6.6e-2 from batch 8)
    near, far = ((bases["ddp"] - bases[name]).abs().max().item() for name in ("b16", "b8"))
    assert near < 1e-3 and far > 50 * near, (near, far)
    assert ddp["refusal_rate_after"] == single["refusal_rate_after"]
    # the KL of 3 tiny steps is ~1e-5, where the two reductions' rounding alone moves it by 1–2% (seen in CI)
    assert ddp["kl"] == pytest.approx(single["kl"], rel=0.1)
    assert ddp["_stdout"].count("refusal (harmful, n=6)") == 1  # the summary is printed by one process
