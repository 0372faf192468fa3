"""Baselines side by side: diff_means, heretic, abliterix and the learned subspace on one organism.

    python scripts/benchmark.py                          # the causal organism, eval on harmful_val / harmless_val
    python scripts/benchmark.py split=holdout            # once, with the chosen settings: ../shared/data/holdout
    python scripts/benchmark.py model=llada_organism "row_overrides.diff_means=['method.scan_layers=[14,16,18,20,22,24,26,28]']"
    python scripts/benchmark.py "rows=[subspace,diff_means,heretic,abliterix]" abliterix.trials=8   # abliterix too

Each method row is `train.py` run as its own process (the command in the table); heretic and abliterix run in
their own venvs (`subspace.baselines.heretic`, `subspace.baselines.abliterix`). Every number comes from this
project's evaluator. Writes benchmark.md and benchmark.json (rows, overhead ratio, settings) into the run directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

# the repository root first on the path, so the script imports this checkout's subspace package
sys.path[0] = str(Path(__file__).resolve().parents[1])
from subspace.config import REPO_ROOT, register_resolvers  # noqa: E402

register_resolvers()
TRAIN_ROWS = ("diff_means", "subspace")
PEER_ROWS = ("heretic", "abliterix")


@hydra.main(version_base="1.3", config_path="../conf", config_name="benchmark")
def main(cfg: DictConfig) -> dict:
    from subspace.benchmark import abliterix_row, heretic_row
    from subspace.benchmark.peer import before_rates
    from subspace.benchmark.rows import markdown_table, train_row
    from subspace.benchmark.splits import data_overrides, split_overrides
    from subspace.evaluation.evaluator import build_evaluator
    from subspace.profiling.measure import profile_training_step
    from subspace.utils.io import write_json

    if unknown := sorted(set(cfg.rows) - set(TRAIN_ROWS) - set(PEER_ROWS)):
        raise ValueError(f"rows {unknown} unknown; valid rows are {[*TRAIN_ROWS, *PEER_ROWS]}")
    out = Path(cfg.paths.output_dir)
    organism = HydraConfig.get().runtime.choices.model
    if unknown := sorted(set(cfg.row_overrides) - set(TRAIN_ROWS)):
        raise ValueError(f"row_overrides for {unknown}: only {list(TRAIN_ROWS)} rows run train.py")
    overrides = [*split_overrides(cfg.split), *cfg.train_overrides]
    rows = [train_row(organism, method, [*overrides, *cfg.row_overrides.get(method, [])], out / method, REPO_ROOT)
            for method in cfg.rows if method in TRAIN_ROWS]

    bundle = instantiate(cfg.model)
    evaluator = build_evaluator(cfg, bundle)
    family = evaluator.family
    report = {"organism": organism, "split": cfg.split, "settings": OmegaConf.to_container(cfg, resolve=True)}
    report["overhead"] = profile_training_step(family, cfg.method.batch_size, cfg.overhead.prompt_length,
                                               cfg.method.rank, cfg.objective.kl_weight, cfg.overhead.steps,
                                               cfg.overhead.warmup, kl_top_k=cfg.objective.kl_top_k)
    peers = {"heretic": (heretic_row.unsupported, heretic_row.heretic_row, heretic_row.HereticSettings),
             "abliterix": (abliterix_row.unsupported, abliterix_row.abliterix_row, abliterix_row.AbliterixSettings)}
    data = before = None
    for method in [m for m in cfg.rows if m in PEER_ROWS]:
        unsupported, run_row, settings = peers[method]
        if why_not := unsupported(organism, family.name):
            rows.append(why_not)
            continue
        if data is None:  # the prompts and the organism's refusal rate, once for every peer row
            data = instantiate(cfg.data, **data_overrides(cfg.split))
            before = before_rates(rows, evaluator, data)
        rows.append(run_row(organism, evaluator, data, out, settings(**cfg[method]), before))

    report["rows"] = [r.as_dict() for r in rows]
    table = markdown_table(rows, family.kl_at)
    ratio = report["overhead"]["step_overhead_ratio"]
    table += (f"\nOne subspace training step costs {ratio:.2f}× a plain frozen forward+backward of the same model "
              f"on the same batch ({cfg.method.batch_size}×{cfg.overhead.prompt_length} tokens per class).\n")
    (out / "benchmark.md").write_text(table)
    write_json(out / "benchmark.json", report)
    print(table)
    return report


if __name__ == "__main__":
    main()
