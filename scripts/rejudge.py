"""Judge a finished run's responses again, optionally cut to their first N tokens:

    python scripts/rejudge.py RUN_DIR [--tokens 48] [--judge three_way] [--out rejudged.json]

Greedy decoding is prefix-consistent (the first 48 tokens of a 96-token greedy answer are the 48-token answer), so
cutting shows what a shorter generation would have been judged, without generating again. Prints the rates before and
after the edit for harmful and harmless prompts, and how many verdicts the cut changed. RUN_DIR is a run directory or
a results/ folder; the latter's samples hold prompt references, resolved from ../shared/data (or $SUBSPACE_SHARED_DATA).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # this checkout's subspace package first
from transformers import AutoTokenizer  # noqa: E402

from subspace.evaluation.judges import VERDICTS, MarkerJudge, ThreeWayJudge  # noqa: E402
from subspace.evaluation.labelled import read_samples  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tokens", type=int, default=None, help="cut every response to its first N tokens")
    parser.add_argument("--judge", default="three_way", help="three_way, three_way_text, marker or a weights file")
    parser.add_argument("--out", type=Path, default=None, help="also write the counts and rates to this JSON file")
    args = parser.parse_args()
    samples = read_samples(args.run_dir / "samples.jsonl")  # a run's text, or results/' prompt references resolved
    judge = MarkerJudge() if args.judge == "marker" else ThreeWayJudge(args.judge)
    if args.tokens is not None:  # the run's own tokenizer (its model must still be where the run loaded it from)
        source = json.loads((args.run_dir / "metrics.json").read_text())["model_source"]
        tokenizer = AutoTokenizer.from_pretrained(source.get("organism") or source["pretrained"])

    def cut(text: str) -> str:
        if args.tokens is None:
            return text
        return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][: args.tokens]).strip()

    print(f"{args.run_dir}: judge {args.judge}, responses cut to {args.tokens or 'their full'} tokens")
    report = {"run_dir": str(args.run_dir), "judge": args.judge, "tokens": args.tokens}
    for split in ("harmful", "harmless"):
        rows = [s for s in samples if s["split"] == split]
        for state in ("before", "after"):
            verdicts = judge.verdicts([r["prompt"] for r in rows], [cut(r[state]) for r in rows])
            counts = Counter(verdicts)
            changed = sum(v != r.get(f"verdict_{state}") for v, r in zip(verdicts, rows))
            rates = "  ".join(f"{v} {counts[v] / len(rows):.1%}" for v in VERDICTS)
            print(f"{split:8} {state:6} n={len(rows):4}  {rates}  (verdict changed for {changed})")
            report[f"{split}_{state}"] = {"n": len(rows), "counts": {v: counts[v] for v in VERDICTS},
                                          "rates": {v: counts[v] / len(rows) for v in VERDICTS}, "changed": changed}
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
