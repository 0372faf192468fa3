"""Methods turn a model and prompts into a `ProjectionEdit`: difference of means, learned subspace."""
