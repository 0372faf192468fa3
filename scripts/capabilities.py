"""Capability benchmarks (lm-evaluation-harness) on a run's model before and after its edit.

    pip install "subspace[capabilities]"
    python scripts/capabilities.py edit=outputs/DATE/TIME tasks=[arc_easy,hellaswag] limit=200 device=cuda

Runs lm-eval in this process on the run's model (from its .hydra/config.yaml) as it is, then with the edit merged
into the weights (restored bit-exactly after), and writes capabilities.json and capabilities.md (task, metric,
base, edited, difference) into the run directory, or out=DIR / out=FILE.json. See docs/capabilities.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

# the repository root first on the path, so the script imports this checkout's subspace package
sys.path[0] = str(Path(__file__).resolve().parents[1])
from subspace.config import register_resolvers  # noqa: E402

register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="capabilities")
def main(cfg: DictConfig) -> dict:
    from subspace.evaluation.capabilities import Settings, evaluate_run, format_table  # after Hydra's parsing

    plain = lambda key: OmegaConf.to_container(cfg[key]) if OmegaConf.is_config(cfg[key]) else cfg[key]  # noqa: E731
    settings = Settings(limit=cfg.limit, batch_size=cfg.batch_size, num_fewshot=cfg.num_fewshot, apply=cfg.apply,
                        apply_chat_template=cfg.apply_chat_template, max_length=cfg.max_length,
                        bootstrap_iters=cfg.bootstrap_iters, seed=cfg.seed)
    report, paths = evaluate_run(cfg.edit, plain("tasks"), settings, model=cfg.get("model"), device=cfg.device,
                                 dtype=cfg.dtype, include_path=plain("include_path"),
                                 include_defaults=cfg.include_defaults, out=cfg.out)
    print(format_table(report.rows))
    for task, c in report.changed.items():
        print(f"{task}: the edit changed the outputs of {c['changed']} of {c['compared']} documents")
    for name, path in paths.items():
        print(f"{name:>8}: {path}")
    return report.to_json()


if __name__ == "__main__":
    main()
