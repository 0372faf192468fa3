"""The real `train.py` on one tiny random model of each kind of architecture, saved as a local checkpoint and loaded
with `model=pretrained` as a user's own model would be: the run finishes and writes a PEFT adapter that, loaded with
plain `peft` on the checkpoint, changes the model's logits.

A random model refuses nothing, and the refusal term needs refusals to remove: these runs judge with a marker judge
whose one marker is the empty string, so every probed response counts as a refusal (plumbing, not behaviour:
`tests/test_behaviour.py` shows an edit removing real refusals)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from subspace.models.tiny import tiny_tokenizer
from subspace.models.tiny_zoo import tiny_model_for
from tests.conftest import ROOT

KINDS = {  # kind of architecture → a model type of that kind (transformers' causal-LM mapping)
    "dense": "llama",
    "parallel attention + MLP block": "gptj",
    "post-norm writers": "gemma2",
    "MoE, fused experts": "qwen3_moe",
    "MoE with shared experts": "qwen2_moe",
    "hybrid (linear attention + attention)": "qwen3_next",
    "multimodal wrapper": "gemma3",
}


def save_checkpoint(model_type: str, folder) -> None:
    tok = tiny_tokenizer()
    tiny_model_for(model_type, tok).save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_train_py_runs_on_a_local_checkpoint_of_each_kind(kind, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_type = KINDS[kind]
    save_checkpoint(model_type, tmp_path / "model")
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "model=pretrained", f"model.pretrained={tmp_path / 'model'}",
           "debug=fast", "logger=csv", f"hydra.run.dir={out}", f"paths.cache_dir={tmp_path / 'cache'}",
           "data.train_harmful=builtin:harmful_train", "data.train_harmless=builtin:harmless_train",
           "data.eval_harmful=builtin:harmful_heldout", "data.eval_harmless=builtin:harmless_heldout",
           "trainer.max_steps=2", "eval.max_new_tokens=4", "eval/judge=marker", "+eval.judge.markers=['']"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    assert done.returncode == 0, f"{model_type}: {done.stderr[-3000:]}"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_harmful"] == 6 and 0 <= metrics["kl"] < float("inf")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        edited = PeftModel.from_pretrained(base, out / "adapter").eval()(input_ids=ids).logits
    assert not torch.allclose(plain, edited), f"{model_type}: the exported edit changes nothing"
    targets = json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    assert targets and not any("vision" in t or "visual" in t for t in targets), targets  # the language model only
