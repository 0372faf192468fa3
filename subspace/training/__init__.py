"""Lightning modules: supervised fine-tuning (organisms) and the learned subspace."""
