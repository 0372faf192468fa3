"""Refusal rate from the model's own sampler, KL at the first response position, judges."""
