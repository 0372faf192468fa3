"""Measure a model organism's refusal on prompts it was never trained on.

    python scripts/evaluate_organism.py                    # the causal organism
    python scripts/evaluate_organism.py model=tiny_organism

Writes organism_quality.json (rates, counts, sources) and the responses into the run directory; for a mixture of
experts with router logits (Mixtral-style) also routing.json / routing.txt (per set and layer: router entropy, each
expert's share; `analysis/routing.py`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

# the repository root first on the path, so the script imports this checkout's subspace package
sys.path[0] = str(Path(__file__).resolve().parents[1])
from subspace.config import register_resolvers  # noqa: E402

register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate_organism")
def main(cfg: DictConfig) -> dict:
    from subspace.data.loading import load_prompts
    from subspace.evaluation.evaluator import build_evaluator
    from subspace.utils.io import write_json, write_jsonl

    bundle = instantiate(cfg.model)
    evaluator = build_evaluator(cfg, bundle)
    family = evaluator.family
    report, rows, sets = {"model": bundle.name, "model_source": bundle.source}, [], {}
    for name, spec in cfg.sets.items():
        prompts = sets[name] = load_prompts(spec.source, limit=spec.limit, name=name)
        rate, texts, flags = evaluator.refusals(prompts, desc=name)
        report[name] = {"refusal_rate": rate, "n": len(prompts), "source": str(spec.source)}
        rows += [{"set": name, "prompt": p, "response": t, "refused": f} for p, t, f in zip(prompts, texts, flags)]
        print(f"{name:>20}: {100 * rate:5.1f}% refused of {len(prompts)}  ({spec.source})")
    out = Path(cfg.paths.output_dir)
    write_json(out / "organism_quality.json", report)
    write_jsonl(out / "organism_responses.jsonl", rows)
    from subspace.analysis.routing import format_routing_table, has_router_logits, routing_stats

    if has_router_logits(family):
        routing = routing_stats(bundle.model, bundle.tokenizer, sets, evaluator.batch_size, family)
        write_json(out / "routing.json", routing)
        (out / "routing.txt").write_text(format_routing_table(routing) + "\n")
        print(f"routing (router entropy, expert shares per layer): {out / 'routing.txt'}")
    return report


if __name__ == "__main__":
    main()
