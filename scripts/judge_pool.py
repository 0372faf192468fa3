"""Draw the responses to be labelled by reading, from the stored samples of this project's runs.

Each drawn response keeps where it came from (results file, family, edit, before/after) and its prompt as a
reference — a `../shared/data` split and index, or one of the project's own `builtin:` sets and index — so the
public sets' text never enters the repository. Usage: python scripts/judge_pool.py OUT.jsonl [--n-per-source N]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from subspace.evaluation.labelled import PromptIndex, read_samples

# (results file, family, edit) -> the responses drawn from it
SOURCES = [
    ("results/causal_default/subspace/samples.jsonl", "causal", "subspace"),
    ("results/causal_tuning/prefix/full/samples.jsonl", "causal", "subspace"),
    ("results/causal_tuning/select64/full/samples.jsonl", "causal", "subspace"),
    ("results/causal_organism/v5/select/v5d_organism_responses.jsonl", "causal", "none"),
    ("results/causal_organism/v4/organism_responses.jsonl", "causal", "none"),
    ("results/llada_tuning/round3/full/samples.jsonl", "llada", "subspace"),
    ("results/llada_tuning/round3/holdout/samples.jsonl", "llada", "subspace"),
    ("results/llada_tuning/round2/full/samples.jsonl", "llada", "subspace"),
    ("results/llada_organism/organism_responses.jsonl", "llada", "none"),
    ("results/diffusion_gemma_tuning/round2/full/samples.jsonl", "diffusion_gemma", "subspace"),
    ("results/diffusion_gemma_tuning/round2/holdout/samples.jsonl", "diffusion_gemma", "subspace"),
    ("results/diffusion_gemma_tuning/carried_over/llada_settings/samples.jsonl", "diffusion_gemma", "subspace"),
    ("results/diffusion_gemma_organism/organism_responses.jsonl", "diffusion_gemma", "none"),
    ("results/moe_organism/organism_responses.jsonl", "moe", "none"),
]


def responses(path: Path, index: PromptIndex):
    for row in read_samples(path, index):  # the results files hold prompt references; this fills the text back in
        if "response" in row:  # organism quality: one response per prompt, no edit
            kind = "harmful" if row["set"].startswith("harmful") else "harmless"
            yield row["prompt"], kind, "before", row["response"]
        else:
            for when in ("before", "after"):
                yield row["prompt"], row["split"], when, row[when]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--n-per-source", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    index, rng, seen, drawn = PromptIndex(), random.Random(args.seed), set(), []
    for file, family, edit in SOURCES:
        rows = list(responses(Path(file), index))
        rng.shuffle(rows)
        rows.sort(key=lambda row: row[2] == "before")  # edited responses first, shuffled within each group
        for wanted in ("harmful", "harmless"):  # half of each source's draw from each kind of prompt
            taken = 0
            for prompt, kind, when, response in rows:
                if kind != wanted or taken == args.n_per_source // 2:
                    continue
                if (family, response) in seen or not index.has(prompt):  # a prompt since removed from the public splits
                    continue
                seen.add((family, response))
                taken += 1
                drawn.append({"id": f"r{len(drawn):04d}", "family": family, "edit": edit if when == "after" else "none",
                              "kind": kind, "source": file, **index.reference(prompt), "response": response})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in drawn))
    print(f"{len(drawn)} responses -> {args.out}")


if __name__ == "__main__":
    main()
