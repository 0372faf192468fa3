"""Ship a built causal organism's LoRA inside the package, so a fresh clone merges it in seconds instead of
fine-tuning it for most of an hour:

    python scripts/ship_organism.py                      # the default organism (model=smollm2_organism)
    python scripts/ship_organism.py model=tiny_organism

Loads the organism as `model.rebuild=true` does (the cached build, or a build now: never the shipped adapter itself),
then writes its adapter and the record a load compares against into subspace/organisms/shipped/NAME/
(`subspace/organisms/shipped.py` says when a shipped adapter stands in for a build).
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

sys.path[0] = str(Path(__file__).resolve().parents[1])  # this checkout's subspace package first
from subspace.config import register_resolvers  # noqa: E402
from subspace.models.gguf import HUB_NAME  # noqa: E402
from subspace.organisms.causal import RECIPE_VERSION, OrganismRecipe  # noqa: E402
from subspace.organisms.recipe import as_recipe  # noqa: E402
from subspace.organisms.shipped import ship  # noqa: E402


def main(overrides: list[str]) -> Path:
    register_resolvers()
    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    if not str(cfg.model._target_).endswith("load_causal_organism"):
        raise ValueError(f"model={cfg.model.name} is not a causal organism (its loader is {cfg.model._target_}); "
                         "only causal organisms ship their LoRA")
    recipe = as_recipe(cfg.model.recipe, OrganismRecipe)
    bundle = instantiate(cfg.model, rebuild=True)
    folder = ship(Path(bundle.source["organism"]), cfg.model.name, bundle.source["organism_key"],
                  bundle.source["base"], recipe, recipe.prompts(), RECIPE_VERSION,
                  base_name=HUB_NAME)
    print(f"shipped {bundle.source['organism']} as {folder}")
    return folder


if __name__ == "__main__":
    main(sys.argv[1:])
