"""Real shapes with random weights: parameter counts, memory estimates and measured step and sampler times."""
