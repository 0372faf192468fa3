"""Hyperparameter sweeps: what train.py returns to a sweeper, and the Pareto front of a finished sweep."""
