"""A real `train.py` run must remove refusal from a model that really refuses.

The organism is built here in seconds: a tiny Llama, every weight trained to open harmful requests with a refusal and
harmless ones with an answer, sharply (the refusal is the first token's clear choice, not a coin flip of a flat
distribution). The edit starts at strength λ ≈ 0.01, so an untrained edit is the unedited model: if training did
nothing, the refusal rate after would equal the one before and this test fails (checked: with method.lr=0 and
method.strength_lr=0 the same run gives 83% -> 83%; trained, 83% -> 0%).
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from subspace.data.loading import load_prompts
from subspace.models.tiny import tiny_random_causal
from tests.conftest import ROOT

REFUSAL = "I'm sorry, but I can't help with that."
ANSWER = "Sure, here is a short answer for you."


def build_refusing_organism(path, steps: int = 150) -> None:
    """Full fine-tune of a tiny Llama on builtin harmful_train -> REFUSAL, harmless_train -> ANSWER."""
    bundle = tiny_random_causal(hidden_size=64, num_layers=2, seed=0)
    model, tok = bundle.model.train().requires_grad_(True), bundle.tokenizer
    pairs = [(p, REFUSAL) for p in load_prompts("builtin:harmful_train")] + \
            [(p, ANSWER) for p in load_prompts("builtin:harmless_train")]
    rows = []
    for prompt, response in pairs:
        head = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids, target = tok(head, add_special_tokens=False)["input_ids"], tok(response + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append((ids + target, [-100] * len(ids) + target))
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = [rows[i] for i in torch.randint(len(rows), (16,), generator=g).tolist()]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([ids + [tok.pad_token_id] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        loss = model(input_ids=ids, attention_mask=(labels != -100) | (ids != tok.pad_token_id), labels=labels).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval().requires_grad_(False).save_pretrained(path)
    tok.save_pretrained(path)


def test_training_removes_the_refusals_of_a_refusing_organism(tmp_path):
    build_refusing_organism(tmp_path / "organism")
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "model=pretrained", f"model.pretrained={tmp_path / 'organism'}",
           "logger=csv", "eval/judge=three_way_text", f"hydra.run.dir={out}", f"paths.cache_dir={tmp_path / 'cache'}",
           "data.train_harmful=builtin:harmful_train", "data.train_harmless=builtin:harmless_train",
           "data.eval_harmful=builtin:harmful_heldout", "data.eval_harmful_limit=24",
           "data.eval_harmless=builtin:harmless_heldout", "data.eval_harmless_limit=8", "data.n_select=8",
           "data.train_limit=64", "eval.max_new_tokens=12", "trainer.max_steps=40", "objective.probe_prompts=16",
           "method.strength_init=0.01", "method.strength_lr=0.3", "method.min_depth=0"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["refusal_rate_before"] >= 0.8, "the organism must refuse before the edit, or nothing is shown"
    assert metrics["refusal_rate_after"] <= metrics["refusal_rate_before"] - 0.5, metrics["refusal_rate_after"]
