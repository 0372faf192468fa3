"""The default organism's LoRA ships inside the package, so a fresh clone merges it in seconds instead of
fine-tuning it for ~35 minutes on two CPU cores.

`python scripts/ship_organism.py [model=NAME]` copies a built organism's adapter into `shipped/NAME/` with a record
of what it was built from. A shipped adapter stands in for a build only when it was built from the same base file,
the same recipe hyperparameters and the same build-code version. Its training prompts are compared too: where the
public splits exist (`../shared/data`) and the prompts differ, the recipe is not the shipped one and is built here;
where they do not exist, the shipped organism is the one every published number was measured on, it is used, and
the log says so. Merged on the same base, a shipped adapter gives the weights of the build it came from bit for bit
(`tests/test_organism.py`). `model.rebuild=true` always builds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Mapping

import peft
import torch
import transformers

from subspace.config import shared_data_dir
from subspace.models.bundle import ModelBundle
from subspace.organisms.recipe import PairsRecipe
from subspace.utils.digest import file_sha256

SHIPPED = Path(__file__).resolve().parent / "shipped"
SOURCES = ("harmful", "harmless", "lookalike")  # resolved paths differ between machines; their prompts are compared


def prompts_sha256(prompts: Mapping[str, list[str]]) -> str:
    return hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()


def hyperparameters(recipe: PairsRecipe) -> dict:
    """The recipe without its prompt sources: what must equal the shipped build's for its adapter to stand in."""
    return json.loads(json.dumps({k: v for k, v in asdict(recipe).items() if k not in SOURCES}, default=list))


def shipped_record(name: str, root: Path | None = None) -> dict | None:
    path = (root or SHIPPED) / name / "organism.json"
    return json.loads(path.read_text()) if path.exists() else None


def usable(record: dict, base: dict, recipe: PairsRecipe, prompts: Mapping[str, list[str]], version: int
           ) -> tuple[bool, str]:
    """(whether the shipped adapter stands in for this recipe, why or why not)."""
    if record["base"] != base:
        return False, f"it was built on another base ({record['base']}, here {base})"
    if record["version"] != version:
        return False, f"it was built by build code v{record['version']}, this is v{version}"
    if record["hyperparameters"] != hyperparameters(recipe):
        theirs, ours = record["hyperparameters"], hyperparameters(recipe)
        changed = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
        return False, f"its recipe differs in {changed}"
    if record["prompts_sha256"] == prompts_sha256(prompts):
        return True, "same base, recipe and prompts"
    if shared_data_dir().exists():
        return False, "its training prompts differ from this recipe's"
    counts = {k: len(v) for k, v in prompts.items()}
    return True, (f"trained on {record['prompt_counts']} prompts, including public splits this machine lacks "
                  f"({shared_data_dir()} is absent; here {counts}); model.rebuild=true builds one from these instead")


def save_shipped(name: str, record: dict, load_base: Callable[[], ModelBundle], folder: Path,
                 root: Path | None = None) -> dict:
    """Merge the shipped adapter into the base as the build merged it, and save the organism into `folder`."""
    root = root or SHIPPED
    adapter = root / name / "adapter_model.safetensors"
    if file_sha256(adapter) != record["adapter_sha256"]:
        raise RuntimeError(f"{adapter} does not match the sha256 its record gives ({record['adapter_sha256']}): a "
                           "damaged or partial file (a Git LFS pointer?); restore it, or build with model.rebuild=true")
    base = load_base()
    merged = peft.PeftModel.from_pretrained(base.model, root / name).merge_and_unload().eval()
    merged.save_pretrained(folder)
    base.tokenizer.save_pretrained(folder)
    return {"shipped": str(root / name), "record": record, "base": base.source,
            "libs": {m.__name__: m.__version__ for m in (torch, transformers, peft)}}


def ship(built: Path, name: str, key: str, base: dict, recipe: PairsRecipe, prompts: Mapping[str, list[str]],
         version: int, root: Path | None = None, base_name: str | None = None) -> Path:
    """Copy the built organism's adapter (`built/adapter`) into `root/name` with the record `usable` reads; its
    config names the base as `base_name` (a hub name), never a path on the building machine."""
    root = root or SHIPPED
    if not (built / "adapter" / "adapter_model.safetensors").exists():
        raise FileNotFoundError(f"{built} holds no adapter/ (built before builds saved their LoRA): rebuild it with "
                                "model.rebuild=true after removing the folder")
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(built / "adapter" / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    config = json.loads((built / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_name  # not the building machine's path
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    info = json.loads((built / "organism.json").read_text())
    record = {"name": name, "organism_key": key, "base": base, "version": version,
              "hyperparameters": hyperparameters(recipe), "prompts_sha256": prompts_sha256(prompts),
              "prompt_counts": {k: len(v) for k, v in prompts.items()},
              "adapter_sha256": file_sha256(folder / "adapter_model.safetensors"),
              "build_seconds": info.get("build_seconds")}
    (folder / "organism.json").write_text(json.dumps(record, indent=2) + "\n")
    return folder
