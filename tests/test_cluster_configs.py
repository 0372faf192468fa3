"""Cluster configs: the trainer strategies (trainer=ddp|fsdp|deepspeed) and the SLURM launcher preset
(hydra/launcher=slurm_gpu) compose, and build what can be built without GPUs or a cluster; tiny-organism runs
with trainer=ddp and trainer=fsdp on 2 CPU processes check the distributed paths end to end.

What is built here: the DDP and FSDP2 (ModelParallelStrategy) runs on CPU (gloo), and the submitit launcher down to
its sbatch script (no `sbatch` is run). DeepSpeed is composed only: Lightning refuses to build DeepSpeedStrategy
without the `deepspeed` package, which no extra installs.
How the ranks share the batches out is tested without processes in tests/test_data_sharding.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.util import find_spec

import lightning as L
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from subspace.training.sharding import HybridShardStrategy
from tests.conftest import ROOT, compose_config

STRATEGIES = {"ddp": "lightning.pytorch.strategies.DDPStrategy", "fsdp": "subspace.training.sharding.HybridShardStrategy",
              "deepspeed": "lightning.pytorch.strategies.DeepSpeedStrategy"}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_configs_compose_on_top_of_gpu(name):
    gpu = compose_config("trainer=gpu").trainer
    cfg = compose_config(f"trainer={name}", "trainer.devices=8", "trainer.num_nodes=2", "model=llada")
    trainer = cfg.trainer
    assert trainer._target_ == "lightning.pytorch.Trainer"
    assert trainer.strategy._target_ == STRATEGIES[name]
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


def test_fsdp_config_builds_the_model_parallel_strategy():
    strategy = instantiate(compose_config("trainer=fsdp").trainer.strategy)
    assert isinstance(strategy, ModelParallelStrategy) and isinstance(strategy, HybridShardStrategy)
    assert strategy._data_parallel_size == strategy._tensor_parallel_size == "auto"
    assert strategy._save_distributed_checkpoint is False  # one file: ckpt_path=last resumes as on one GPU


def test_merged_evaluation_is_refused_under_fsdp_before_training(tmp_path, cache_dir, tiny_organism):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "model=tiny_organism", "debug=fast", "logger=csv",
                             f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'run'}", "trainer=fsdp",
                             "trainer.accelerator=cpu", "trainer.devices=2", "eval.apply=merged"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "use eval.apply=hooks" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training step

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


def test_ddp_and_fsdp_on_two_cpu_processes_shard_the_batches_and_only_rank_zero_writes(tmp_path, cache_dir, tiny_organism):
    """`trainer=ddp` with gloo on 2 CPU processes: the run completes, rank 1 stops after fitting (one process
    evaluates and writes the run directory), and each rank trains on its own shard of the prompts. With 16 prompts
    per class, a step of 2 ranks at batch size 8 sees all 32, as one process at batch size 16 does: the edits agree
    up to float rounding (DDP averages two 8-prompt means, one process takes one 16-prompt mean), and differ from a
    one-process run at batch size 8 (what every rank trained on before the batches were sharded)."""
    from safetensors.torch import load_file

    from tests.conftest import run_train

    runs = {"b16": ["method.batch_size=16"], "b8": ["method.batch_size=8"],
            "ddp": ["method.batch_size=8", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                    "trainer.precision=32-true"],
            "fsdp": ["method.batch_size=8", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"]}
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
    # trainer=fsdp: the model and the subspace sharded over both ranks, both evaluating in step, rank 0 writing;
    # FSDP2 averages the subspace's gradients as DDP does, so the edit agrees with the others up to rounding
    fsdp = metrics["fsdp"]
    assert fsdp["model_sharded"] is True and not ddp["model_sharded"] and not single["model_sharded"]
    assert (bases["fsdp"] - bases["b16"]).abs().max().item() < 1e-3
    assert (bases["fsdp"] - bases["ddp"]).abs().max().item() < 1e-3
    assert fsdp["refusal_rate_after"] == single["refusal_rate_after"]
    assert fsdp["kl"] == pytest.approx(single["kl"], rel=0.1)
    assert fsdp["_stdout"].count("refusal (harmful, n=6)") == 1
    assert (tmp_path / "fsdp" / "run" / "adapter" / "adapter_model.safetensors").exists()  # gathered for export


def test_fsdp_run_resumes_from_its_checkpoint_to_the_uninterrupted_edit(tmp_path, cache_dir, tiny_organism):
    """trainer=fsdp writes one checkpoint file of the (sharded) subspace, its optimiser state and the data order;
    `ckpt_path=last` on 2 processes continues to the very edit of an uninterrupted 2-process run."""
    from safetensors.torch import load_file

    from tests.conftest import run_train

    fsdp = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "method.batch_size=4"]
    every = "callbacks.model_checkpoint.every_n_train_steps=2"
    (tmp_path / "once").mkdir(), (tmp_path / "resumed").mkdir()
    run_train(tmp_path / "once", cache_dir, *fsdp, "trainer.max_steps=5")
    run_train(tmp_path / "resumed", cache_dir, *fsdp, every, "trainer.max_steps=2")
    assert (tmp_path / "resumed" / "run" / "checkpoints" / "last.ckpt").is_file()
    resumed = run_train(tmp_path / "resumed", cache_dir, *fsdp, every, "trainer.max_steps=5", "ckpt_path=last")
    assert resumed["model_sharded"] is True and resumed["steps"] == 5
    once, again = (load_file(tmp_path / name / "run" / "edit.safetensors") for name in ("once", "resumed"))
    assert torch.equal(once["bases"], again["bases"])


def test_fsdp_runs_the_llada_sampler_on_every_rank_in_step(tmp_path, cache_dir, tiny_organism):
    """The LLaDA family under trainer=fsdp: its own sampler (forwards of the sharded model, no `generate`) runs on
    both ranks in step after training, and the run ends as a single process's would, with the same sampled texts."""
    from tests.conftest import run_train

    (tmp_path / "one").mkdir(), (tmp_path / "fsdp").mkdir()
    fsdp = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "method.batch_size=4"]
    single = run_train(tmp_path / "one", cache_dir, "method.batch_size=8", model="tiny_llada_organism")
    sharded = run_train(tmp_path / "fsdp", cache_dir, *fsdp, model="tiny_llada_organism")
    assert sharded["model_sharded"] is True and sharded["family"] == "llada"
    assert sharded["refusal_rate_before"] == single["refusal_rate_before"]
    def unedited(name: str) -> list[str]:
        lines = (tmp_path / name / "run" / "samples.jsonl").read_text().splitlines()
        return [json.loads(line)["before"] for line in lines]

    assert unedited("fsdp") == unedited("one")  # the unedited model samples the same text, sharded or not


def test_fsdp_refuses_fused_experts_the_edit_swaps_in_before_sharding_anything():
    """An expert-masked edit (moe_scope=active_only) swaps projected copies of the fused expert weights in around
    the experts' forward, which FSDP2's gathered parameters would not see: configure_model says so instead."""
    from subspace.families import CausalFamily
    from subspace.training.subspace_module import LearnedSubspace, SubspaceModule
    from subspace.utils.sharded import is_sharded
    from tests.conftest import EXPERTS, tiny_moe

    model = tiny_moe("qwen3_moe")
    family = CausalFamily(model)
    sites = [s.name for s in family.writer_sites()]
    masks = {name: torch.arange(EXPERTS) % 2 == 0 for name in sites if name.endswith("experts.down_proj")}
    subspace = LearnedSubspace(torch.randn(1, family.hidden_size, 2), [0] * len(sites))
    module = SubspaceModule(family, sites, subspace, torch.tensor([5]), expert_masks=masks)
    module.configure_model()  # no device mesh (every strategy but trainer=fsdp): nothing happens
    module._device_mesh = object()  # what Lightning's ModelParallelStrategy sets before calling it
    with pytest.raises(NotImplementedError, match=r"experts\.down_proj.*use trainer=ddp"):
        module.configure_model()
    assert not is_sharded(model)
