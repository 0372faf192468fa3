"""Leak check of every report set against every training and selection set, ignoring case, spacing and punctuation.

    python scripts/check_leaks.py            # ../shared/data/prompts *_val and holdout/ against *_train and the builtin sets
Exits 1 and lists the pairs when a report prompt occurs in a set that organisms or edits are fitted or chosen on.
(The test suite runs the same check without holdout/, which tests never read.)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # this checkout's subspace package first
from subspace.data.leaks import HOLDOUT, PUBLIC_EVAL, PUBLIC_TRAIN, builtin_sets, leaks, public_sets  # noqa: E402


def main() -> int:
    eval_sets = public_sets(PUBLIC_EVAL + HOLDOUT) | builtin_sets(("harmful_heldout", "harmless_heldout", "lookalike_heldout"))
    train_sets = public_sets(PUBLIC_TRAIN) | builtin_sets()
    found = leaks(eval_sets, train_sets)
    print(f"{len(eval_sets)} report sets ({', '.join(eval_sets)}) against {len(train_sets)} training/selection sets")
    for name, hits in found.items():
        print(f"LEAK {name}: " + ", ".join(f"{n} in {train}" for train, n in hits.items()))
    print("no leak" if not found else f"{len(found)} report sets leak")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
