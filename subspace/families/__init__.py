"""Family adapters: the only place that knows an architecture's module names."""

from subspace.families.causal import CausalFamily, WriterSite, family_for

__all__ = ["CausalFamily", "WriterSite", "family_for"]
