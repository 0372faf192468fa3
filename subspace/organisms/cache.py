"""Organisms are built once per key, under a file lock, into a folder renamed into place only when complete.

The key hashes everything the weights depend on: the base, the recipe, its prompts, the build code's
version and the library versions.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Mapping

import lightning as L
import peft
import torch
import transformers
from filelock import FileLock

from subspace.organisms.recipe import PairsRecipe
from subspace.utils.io import atomic_dir

def organism_key(base: dict, recipe: PairsRecipe, prompts: Mapping[str, list[str]], version: int,
                 accelerator: str = "cpu") -> str:
    """16 hex digits of the hash of everything the weights depend on; `version` is the build code's (each organism
    kind's `*_VERSION`, bumped when its build changes what it produces). An accelerator other than the CPU (which
    built every cached organism, and whose keys therefore leave it out) gives other numerics: a key of its own.
    Recipe fields left at None are left out too, so a field added later with a None default keeps earlier keys."""
    recipe_fields = {k: v for k, v in asdict(recipe).items() if v is not None}
    blob = {"base": base, "recipe": recipe_fields, "version": version, "prompts": prompts,
            "libs": {m.__name__: m.__version__ for m in (torch, transformers, peft, L)}}
    if accelerator != "cpu":
        blob["accelerator"] = accelerator
    blob = json.dumps(blob, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_built(folder: Path) -> bool:
    """Whether `folder` holds a finished build (its record is written last, inside the folder renamed into place)."""
    return (folder / "organism.json").exists()


def build_once(cache_dir: str, name: str, key: str, build: Callable[[Path], dict]) -> Path:
    """`cache_dir/organisms/NAME-KEY`, built by `build(tmp_dir) -> info` under a file lock if it is not there yet.

    The build writes into a temporary sibling that is renamed into place only when it succeeds, so
    an interrupted build leaves nothing that looks finished.
    """
    folder = Path(cache_dir).expanduser() / "organisms" / f"{name}-{key}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not is_built(folder):
            start = time.time()
            with atomic_dir(folder) as tmp:
                info = build(tmp)
                info["build_seconds"] = round(time.time() - start, 1)
                (tmp / "organism.json").write_text(json.dumps(info, indent=2, default=list))
    return folder
