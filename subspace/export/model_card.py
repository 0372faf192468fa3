"""A model card (`README.md`) for an exported adapter or merged model: what a hub user reads before loading it.

It says what the weights are (base model, method and its settings), how they were made (the command, the commit)
and what was measured (the run's before/after rates and KL, with the evaluation sets and the judge), so a copied
folder still carries its provenance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

RATES = (("refusal", "harmful prompts refused"), ("answer", "harmful prompts answered readably"),
         ("broken", "harmful prompts answered with broken text"))


def _pct(value: Any) -> str:
    return "—" if value is None else f"{100 * float(value):.1f}%"


def model_card(metrics: Mapping[str, Any], settings: Mapping[str, Any], kind: str, command: str) -> str:
    """The card's markdown for `kind` ("adapter": a PEFT LoRA of the edit; "merged": the edited model itself);
    `settings` the method's (`Method.describe()`)."""
    base = metrics.get("model_source", {}).get("organism") or metrics.get("model_source", {}).get("pretrained")
    method = settings.get("method", "?")
    front = ["---", "library_name: " + ("peft" if kind == "adapter" else "transformers")]
    if base:
        front.append(f"base_model: {base}")
    front += ["tags: [subspace, refusal-removal, activation-editing]", "---", ""]
    harmful, harmless = metrics.get("n_harmful"), metrics.get("n_harmless")
    rows = [f"| {label} | {_pct(metrics.get(f'{v}_rate_before'))} | {_pct(metrics.get(f'{v}_rate_after'))} |"
            for v, label in RATES]
    rows.append(f"| harmless prompts answered readably | {_pct(metrics.get('harmless_answer_rate_before'))} | "
                f"{_pct(metrics.get('harmless_answer_rate_after'))} |")
    what = ("a PEFT LoRA adapter whose merge projects the refusal subspace out of the residual-stream writers"
            if kind == "adapter" else "the model with the refusal edit merged into its weights")
    load = ("```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, THIS_FOLDER)"
            ".merge_and_unload()\n```" if kind == "adapter" else
            "```python\nfrom transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained("
            "THIS_FOLDER)\n```")
    commit = metrics.get("git_commit") or "unknown"
    dirty = " (with uncommitted changes)" if metrics.get("git_dirty") else ""
    return "\n".join(front + [
        f"# {metrics.get('model', 'model')}: refusal removed by `{method}` ({kind})",
        "",
        f"This folder holds {what}, made by subspace from `{base}`.",
        "",
        f"Made with: `{command}` at commit `{commit}`{dirty}, seed {metrics.get('seed')}.",
        "",
        "## Method and settings",
        "",
        "```json",
        json.dumps(dict(settings), indent=2, default=str),
        "```",
        "",
        "## Measured (before → after the edit, in the run that made it)",
        "",
        f"{harmful} harmful and {harmless} harmless evaluation prompts, {metrics.get('max_new_tokens')} new tokens, "
        f"judge `{metrics.get('judge')}`.",
        "",
        "| | before | after |",
        "|---|---|---|",
        *rows,
        "",
        f"KL(original ‖ edited) on harmless prompts: {metrics.get('kl', float('nan')):.4f} at the first response "
        f"token, {metrics.get('kl_response', float('nan')):.4f} over the first {metrics.get('kl_response_tokens')} "
        "tokens of the original model's own answers.",
        "",
        "## Load",
        "",
        load,
        "",
    ])


def write_model_cards(run_dir: Path, metrics: Mapping[str, Any], settings: Mapping[str, Any], command: str
                      ) -> list[Path]:
    """`README.md` into `run_dir/adapter` and `run_dir/merged`, where the run exported them."""
    written = []
    for kind in ("adapter", "merged"):
        if (run_dir / kind).is_dir():
            path = run_dir / kind / "README.md"
            path.write_text(model_card(metrics, settings, kind, command))
            written.append(path)
    return written
