#!/bin/bash
# The README's first command from a fresh clone, timed: with ../shared (clone under /work) and without (under /tmp).
# A fresh HOME: no pip cache, no ~/.cache/subspace (no organism, no GGUF, no judge LM).
for where in /tmp/freshB /work/freshA; do
  rm -rf $where /tmp/home_$(basename $where)
  git clone -q /work/main $where
  cd $where
  cmd=$(sed -n '/^```bash/{n;p;q}' README.md)
  echo "== $where  $(git rev-parse --short HEAD)  shared: $(ls -d ../shared 2>/dev/null || echo absent)"
  echo "   command: $cmd"
  start=$(date +%s)
  HOME=/tmp/home_$(basename $where) bash -c "$cmd" > $where.log 2>&1
  rc=$?
  echo "   rc=$rc  seconds=$(( $(date +%s) - start ))  $(date -u)"
  grep -n "Successfully installed\|organism\|wall time\|refusal (harmful\|answer (harmful" $where.log | tail -8
done
