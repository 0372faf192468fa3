"""One edit in weight form and in residual form: what each leaves along the edit's directions, layer by layer, and
the refusal and KL each gives (the post-norm gap; `subspace/analysis/post_norm_gap.py`).

    python scripts/post_norm_gap.py model=diffusion_gemma_organism edit=RUN_DIR/edit.safetensors

Writes post_norm_gap.json and post_norm_gap.txt into the run directory. The layer table is read on the harmful
prompts (where the refused direction is present), the refusal on them too, the KL on the harmless prompts.
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


@hydra.main(version_base="1.3", config_path="../conf", config_name="post_norm_gap")
def main(cfg: DictConfig) -> dict:
    from subspace.analysis.post_norm_gap import along_edit, format_gap_table, gap_rows, residual_form
    from subspace.data.loading import load_prompts
    from subspace.evaluation.evaluator import build_evaluator
    from subspace.interventions.edit import ProjectionEdit
    from subspace.utils.io import write_json

    bundle = instantiate(cfg.model)
    model = bundle.model
    evaluator = build_evaluator(cfg, bundle, apply="merged")  # the weight form; the residual form has hooks only
    family = evaluator.family
    edit = ProjectionEdit.load(cfg.edit)
    residual = residual_form(edit, family)
    harmful = load_prompts(cfg.harmful.source, limit=cfg.harmful.limit, name="harmful")
    harmless = load_prompts(cfg.harmless.source, limit=cfg.harmless.limit, name="harmless")

    measure = lambda edited: along_edit(evaluator, harmful, residual, edited)  # noqa: E731
    rows = gap_rows(family, residual, measure(None), measure(edit.merged(model)), measure(residual.applied(model)))
    report = {"model": bundle.name, "family": family.name, "edit": str(cfg.edit), "n_harmful": len(harmful),
              "n_harmless": len(harmless), "kl_at": family.kl_at, "layers": rows}
    reference = evaluator.logprobs(harmless)
    for form, e in (("weight_form", edit), ("residual_form", residual)):
        rate, _, _ = evaluator.refusals(harmful, e, f"harmful, {form}")
        report[form] = {"refusal_rate": rate, "kl": evaluator.kl(harmless, e, reference)}
        print(f"{form:>14}: refusal {100 * rate:5.1f}% of {len(harmful)}, KL {report[form]['kl']:.4f}")
    table = format_gap_table(rows)
    print(table)
    out = Path(cfg.paths.output_dir)
    write_json(out / "post_norm_gap.json", report)
    (out / "post_norm_gap.txt").write_text(table + "\n")
    return report


if __name__ == "__main__":
    main()
