"""Profile a real architecture with random weights: size, memory per component, step and sampler cost.

    python scripts/profile.py architecture=llada_8b meta_only=true     # any size: counts and estimates
    python scripts/profile.py architecture=llada_8b layers=4           # measured, first 4 layers
    python scripts/profile.py architecture=llada_8b trainer=...        # (on a GPU: device=auto picks cuda)

Writes profile.json into the run directory and prints it.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

# The repository root replaces this script's folder on the path: here `profile` would shadow the standard library's.
sys.path[0] = str(Path(__file__).resolve().parents[1])
from subspace.config import register_resolvers  # noqa: E402

register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="profile")
def main(cfg: DictConfig) -> dict:
    from subspace.families import family_for
    from subspace.models.bundle import resolve_dtype
    from subspace.profiling.architecture import architecture_config, count_parameters, random_model
    from subspace.profiling.estimate import estimate_memory
    from subspace.profiling.measure import profile_sampler, profile_training_step
    from subspace.utils.io import write_json

    arch = OmegaConf.to_container(cfg.architecture, resolve=True)
    config = architecture_config(arch, cfg.layers)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    model = random_model(arch, config, cfg.dtype, "meta" if cfg.meta_only else device, cfg.seed)
    family = family_for(model, **arch.get("family", {}))
    tokens = cfg.prompt_length + getattr(family, "canvas_length", 0)
    params = count_parameters(model, family.layers)
    stacked = {s.name for s in family.writer_sites() if s.kind == "expert_out" and s.expert is None}
    edited_expert_parameters = sum(p.numel() for name, p in model.named_parameters() if name in stacked)
    report = {
        "architecture": cfg.architecture.config._target_.rsplit(".", 1)[-1], "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size, "dtype": cfg.dtype, "device": str(device) if not cfg.meta_only else "meta",
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "batch_size": cfg.batch_size, "tokens_per_sequence": tokens, "rank": cfg.rank,
        "parameters": params,
        "estimate": estimate_memory(config, params["total"], resolve_dtype(cfg.dtype).itemsize, cfg.batch_size, tokens,
                                    cfg.rank, family.num_layers, cfg.kl_rows, getattr(family, "kl_positions", 1),
                                    edited_expert_parameters),
    }
    if not cfg.meta_only:
        report["weights_allocated_gib"] = (torch.cuda.memory_allocated(device) / 1024 ** 3
                                           if device.type == "cuda" else None)
        report["training"] = profile_training_step(family, cfg.batch_size, cfg.prompt_length, cfg.rank, cfg.kl_weight,
                                                   cfg.steps, cfg.warmup, cfg.seed)
        if hasattr(family, "sampler"):
            report["sampler"] = profile_sampler(family, cfg.batch_size, cfg.prompt_length, cfg.gen_length, cfg.seed)
    write_json(Path(cfg.paths.output_dir) / "profile.json", report)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
