"""An organism's quality against its fine-tune's steps, from the snapshots its build saved (`snapshot_every`).

    python scripts/organism_curve.py model=llada_organism_v2 organism_sets=select curve.limit=32

For every snapshot and the finished organism: each set's responses from the model's own sampler, judged by the
three-way judge (`eval/judge=`), and the rates of `answer`, `refusal` and `broken`. Writes curve.csv, curve.png and
curve_responses.jsonl into the run directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

sys.path[0] = str(Path(__file__).resolve().parents[1])  # this checkout's subspace package first
from subspace.config import register_resolvers  # noqa: E402

register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="organism_curve")
def main(cfg: DictConfig) -> list[dict]:
    from subspace.analysis.plots import plot_organism_curve
    from subspace.data.loading import load_prompts
    from subspace.evaluation.evaluator import build_evaluator, verdict_rates
    from subspace.organisms.snapshots import load_snapshot, snapshot_steps
    from subspace.utils.io import write_csv, write_jsonl

    bundle = instantiate(cfg.model)
    folder = Path(bundle.source["organism"])
    steps = snapshot_steps(folder / "snapshots")
    if not steps:
        raise FileNotFoundError(f"{folder} has no snapshots/stepN: build the organism with model.snapshot_every=N "
                                f"(a new build: the snapshots are saved during the fine-tune)")
    steps[int(cfg.curve.final_step)] = folder
    evaluator = build_evaluator(cfg, bundle)
    sets = {name: load_prompts(spec.source, limit=cfg.curve.limit or spec.limit, name=name) for name, spec in cfg.sets.items()}
    table, responses = [], []
    for step, where in steps.items():
        load_snapshot(bundle.model, where)
        row = {"step": step}
        for name, prompts in sets.items():
            texts, verdicts = evaluator.judged(prompts, desc=f"step {step}: {name}")
            row |= {f"{name}_{k}": v for k, v in verdict_rates(verdicts).items()}
            responses += [{"step": step, "set": name, "prompt": p, "response": t, "verdict": v}
                          for p, t, v in zip(prompts, texts, verdicts)]
        table.append(row)
        print(row, flush=True)
    out = Path(cfg.paths.output_dir)
    write_csv(out / "curve.csv", table)
    write_jsonl(out / "curve_responses.jsonl", responses)
    plot_organism_curve(table, list(sets), out / "curve.png", title=bundle.name)
    return table


if __name__ == "__main__":
    main()
