"""Where refusal lives: per-layer geometry of harmful vs harmless residuals, before and after an edit.

    python scripts/analyze.py                                   # the causal organism, as it is
    python scripts/analyze.py model=tiny_organism edit=outputs/DATE/TIME/edit.safetensors \\
        training_log=outputs/DATE/TIME/csv/metrics.csv

Writes geometry.csv / geometry.json (one row per layer) and separation.png, pca_before.png,
pca_after.png (with an edit) and training_curves.png (with a training log) into the run directory.
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
SPLITS = ("train", "select", "eval")


def summary(table: dict[str, list], reference_layer: int) -> str:
    """One line per layer: the numbers a reader looks at first."""
    columns = [c for c in ("cosine_before", "cosine_after", "probe_accuracy_before", "probe_accuracy_after",
                           "subspace_share_before") if c in table]
    cell = lambda v: "     —" if v is None else f"{v:6.3f}"  # noqa: E731
    lines = ["layer  " + "  ".join(f"{c:>22}" for c in columns)]
    for i, layer in enumerate(table["layer"]):
        mark = " *" if layer == reference_layer else "  "
        lines.append(f"{layer:>5}{mark}" + "  ".join(f"{cell(table[c][i]):>22}" for c in columns))
    return "\n".join(lines + [f"* reference layer (class means least alike): {reference_layer}"])


@hydra.main(version_base="1.3", config_path="../conf", config_name="analyze")
def main(cfg: DictConfig) -> dict:
    if cfg.split not in SPLITS:
        raise ValueError(f"split={cfg.split!r} is not one of {SPLITS}")
    if cfg.n_prompts is not None and cfg.n_prompts < 2:
        raise ValueError(f"n_prompts={cfg.n_prompts} must be ≥ 2 (the probe fits on one part and tests on another)")
    if cfg.edit is not None and not Path(cfg.edit).is_file():
        raise FileNotFoundError(f"edit={cfg.edit} does not exist; pass a run's edit.safetensors")

    from subspace.analysis import ProbeSettings, measure, read_training_curves  # heavy: after the checks
    from subspace.analysis.report import write_report
    from subspace.families import family_for
    from subspace.interventions.edit import ProjectionEdit

    curves = read_training_curves(cfg.training_log) if cfg.training_log else None  # fail before loading the model

    bundle = instantiate(cfg.model)
    family = family_for(bundle.model, cfg.long_prompts, **bundle.family_options)
    data = instantiate(cfg.data)
    harmful, harmless = (data[f"{cfg.split}_{c}"][: cfg.n_prompts] for c in ("harmful", "harmless"))
    edit = ProjectionEdit.load(cfg.edit) if cfg.edit else None
    pca_layers = None if cfg.pca_layers is None else [family.check_layer(l, "pca_layers") for l in cfg.pca_layers]
    geometry = measure(family, bundle.tokenizer, harmful, harmless, edit, cfg.batch_size, cfg.system_prompt,
                       cfg.reference_layer, ProbeSettings(**cfg.probe))
    geometry.meta |= {"model": bundle.name, "split": cfg.split, "edit_path": cfg.edit, "training_log": cfg.training_log}
    paths = write_report(geometry, cfg.paths.output_dir, curves, bundle.name, pca_layers)
    print(summary(geometry.table, geometry.meta["reference_layer"]))
    for name, path in paths.items():
        print(f"{name:>16}: {path}")
    return geometry.meta


if __name__ == "__main__":
    main()
