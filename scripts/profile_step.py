"""Profile a real architecture with random weights: size, memory per component, step and sampler cost.

    python scripts/profile_step.py architecture=llada_8b meta_only=true     # any size: counts and estimates
    python scripts/profile_step.py architecture=llada_8b layers=4           # measured, first 4 layers
    python scripts/profile_step.py architecture=llada_8b trainer=...        # (on a GPU: device=auto picks cuda)

Counts and estimates come from a build on `meta`; the measured step is skipped (with the reason in the report)
where the weights alone would not fit the device's free memory.

Writes profile.json into the run directory and prints it.
"""

from __future__ import annotations

import json
import os
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
    from subspace.interventions.projection import ProjectionHooks
    from subspace.models.bundle import resolve_dtype
    from subspace.profiling.architecture import architecture_config, count_parameters, random_model
    from subspace.profiling.estimate import estimate_memory
    from subspace.profiling.measure import profile_sampler, profile_training_step
    from subspace.utils.io import write_json

    arch = OmegaConf.to_container(cfg.architecture, resolve=True)
    config = architecture_config(arch, cfg.layers)
    text = config.get_text_config()  # the decoder's shape (DiffusionGemma nests it beside a vision config)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    model = random_model(arch, config, cfg.dtype, "meta", cfg.seed)  # counts and estimates: no memory
    family = family_for(model, **arch.get("family", {}))
    tokens = cfg.prompt_length + getattr(family, "canvas_length", 0)
    params = count_parameters(model, family.layers)
    stacked = sorted(s.name for s in family.writer_sites() if s.kind == "expert_out" and s.expert is None)
    hooks = ProjectionHooks.for_sites(model, stacked)  # which fused experts still need projected weight copies
    swapped = {site.name for site, path in zip(hooks.sites, hooks.paths) if path == "weight"}
    edited_expert_parameters = sum(p.numel() for name, p in model.named_parameters(remove_duplicate=False)
                                   if name in swapped)  # the site's name, even where another name comes first
    report = {
        "architecture": cfg.architecture.config._target_.rsplit(".", 1)[-1], "layers": text.num_hidden_layers,
        "hidden_size": text.hidden_size, "dtype": cfg.dtype, "device": str(device) if not cfg.meta_only else "meta",
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "batch_size": cfg.batch_size, "tokens_per_sequence": tokens, "rank": cfg.rank,
        "parameters": params,
        "fused_expert_sites": {"edited_at_output": len(stacked) - len(swapped), "projected_weight_copies": len(swapped)},
        "estimate": estimate_memory(config, params["total"], resolve_dtype(cfg.dtype).itemsize, cfg.batch_size, tokens,
                                    cfg.rank, family.num_layers, cfg.kl_rows, getattr(family, "kl_positions", 1),
                                    edited_expert_parameters, cfg.kl_top_k),
    }
    free_gib = (torch.cuda.mem_get_info(device)[0] if device.type == "cuda"
                else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) / 1024 ** 3
    if not cfg.meta_only and report["estimate"]["weights_gib"] > 0.9 * free_gib:
        report["device"] = "meta"
        report["measured"] = (f"skipped: {report['estimate']['weights_gib']:.1f} GiB of weights do not fit the "
                              f"{free_gib:.1f} GiB free on {device} (try layers=N)")
    elif not cfg.meta_only:
        model = random_model(arch, config, cfg.dtype, device, cfg.seed)
        family = family_for(model, **arch.get("family", {}))
        report["weights_allocated_gib"] = (torch.cuda.memory_allocated(device) / 1024 ** 3
                                           if device.type == "cuda" else None)
        report["training"] = profile_training_step(family, cfg.batch_size, cfg.prompt_length, cfg.rank, cfg.kl_weight,
                                                   cfg.steps, cfg.warmup, cfg.seed, cfg.kl_top_k,
                                                   cfg.gradient_checkpointing)
        if hasattr(family, "sampler"):
            report["sampler"] = profile_sampler(family, cfg.batch_size, cfg.prompt_length, cfg.gen_length, cfg.seed)
    write_json(Path(cfg.paths.output_dir) / "profile.json", report)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
