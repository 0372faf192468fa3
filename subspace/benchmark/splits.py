"""Which prompts the benchmark reports on: the val split (tune here), or the public holdout split, once."""

from __future__ import annotations

from subspace.config import shared_data_dir

SPLITS = ("val", "holdout")


def split_overrides(split: str) -> list[str]:
    """`train.py` overrides that point the eval prompts at the split (none for val: the data config's default)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    if split == "val":
        return []
    holdout = shared_data_dir() / "holdout"
    files = {"eval_harmful": holdout / "harmful_test.json", "eval_harmless": holdout / "harmless_test.json"}
    if missing := [str(path) for path in files.values() if not path.is_file()]:
        raise FileNotFoundError(f"split=holdout needs {missing}: the public holdout split "
                                "(../shared/data/holdout beside the project, or $SUBSPACE_SHARED_DATA/holdout)")
    return [f"data.{key}={path}" for key, path in files.items()]


def data_overrides(split: str) -> dict[str, str]:
    """The same as keyword arguments of the data config, for the rows evaluated in the benchmark's own process."""
    return dict(arg.removeprefix("data.").split("=", 1) for arg in split_overrides(split))
