#!/usr/bin/env bash
# The four candidates of plan.md, one after another (2 CPU cores: never two at once).
set -euo pipefail
common="model=diffusion_gemma_organism method=subspace data.n_select=64 data.eval_harmful_limit=10 data.eval_harmless_limit=20 logger=csv"
run() { local id=$1; shift; python train.py $common "$@" hydra.run.dir="${OUT:-/tmp/runs}/dg_sel64_$id"; }
run D1
run D2 objective.kl_weight=1
run D3 trainer.max_steps=180
run D4 method.rank=8
