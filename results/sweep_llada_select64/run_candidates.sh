#!/usr/bin/env bash
# The four candidates of plan.md, one after another (2 CPU cores: never two at once).
set -euo pipefail
common="model=llada_organism method=subspace data.n_select=64 data.eval_harmful_limit=10 data.eval_harmless_limit=20 logger=csv"
run() { local id=$1; shift; python train.py $common "$@" hydra.run.dir="${OUT:-/tmp/runs}/llada_sel64_$id"; }
run C1
run C3 method.learn_strength=false
run C2 objective.kl_weight=1
run C4 method.min_depth=0.15
