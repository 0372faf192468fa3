"""Judge responses: `python scripts/judge.py IN.jsonl OUT.jsonl [--judge three_way|three_way_text|marker|W.json]`.

IN has one JSON object per line with `prompt` and `response` (and optionally `label`); OUT gets every line with a
`verdict` added (refusal, answer or broken). Where labels are present, the agreement and the confusion matrix are
printed. IN may be `labelled:check` or `labelled:fit`: a half of the project's labelled set (its prompts are read from
../shared/data). `python scripts/judge.py fit OUT.json [--text-only]` refits the weights on `labelled:fit`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from subspace.evaluation.judges import MarkerJudge, ReferenceLM, ThreeWayJudge, fit_three_way
from subspace.evaluation.labelled import agreement, format_agreement, load_labelled


def read(source: str) -> list[dict]:
    if source.startswith("labelled:"):
        return load_labelled(part=source.split(":", 1)[1])
    rows = [json.loads(line) for line in Path(source).read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows):
        if not {"prompt", "response"} <= set(row):
            raise ValueError(f"{source} line {i + 1} has keys {sorted(row)}; each line needs 'prompt' and 'response'")
    return rows


def judge_file(args: argparse.Namespace) -> None:
    rows = read(args.input)
    judge = MarkerJudge() if args.judge == "marker" else ThreeWayJudge(args.judge, reference=args.reference)
    verdicts = judge.verdicts([r["prompt"] for r in rows], [r["response"] for r in rows])
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({k: v for k, v in r.items() if not args.input.startswith("labelled:") or k != "prompt"}
                                      | {"verdict": v}, ensure_ascii=False) + "\n" for r, v in zip(rows, verdicts)))
    labelled = [(r["label"], v) for r, v in zip(rows, verdicts) if r.get("label") is not None]
    print(f"{len(rows)} responses judged by {args.judge} -> {out}")
    if labelled:
        print(format_agreement(agreement(*map(list, zip(*labelled)))))


def fit(args: argparse.Namespace) -> None:
    rows = read("labelled:fit")
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    lm = None if args.text_only else ReferenceLM(args.reference).scores(prompts, responses)
    state = fit_three_way(prompts, responses, [r["label"] for r in rows], lm) | {"reference": None if args.text_only else args.reference}
    Path(args.output).write_text(json.dumps(state, indent=1) + "\n")
    print(f"fitted on {len(rows)} labelled responses (l2 {state['l2']}, cross-validated accuracy {state['cv_accuracy']}) -> {args.output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="IN.jsonl, labelled:check, labelled:fit, or 'fit'")
    parser.add_argument("output", help="OUT.jsonl (or, after 'fit', the weights file to write)")
    parser.add_argument("--judge", default="three_way", help="three_way (default), three_way_text, marker, or a weights file")
    parser.add_argument("--reference", default="smollm2", help="the reference LM for the NLL feature (default smollm2)")
    parser.add_argument("--text-only", action="store_true", help="with 'fit': text features only, no reference LM")
    args = parser.parse_args()
    fit(args) if args.input == "fit" else judge_file(args)


if __name__ == "__main__":
    main()
