"""Baselines side by side in one harness: every row evaluated by this project's evaluator (sampler, judge, prompts,
KL), so the numbers compare. `scripts/benchmark.py` is the entry point."""
