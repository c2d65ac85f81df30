#!/usr/bin/env bash
# The GLUE rho grid (SAM, SSAM-F, δ-SAM against AdamW on MRPC and RTE, 3 seeds) and the full-size table at the
# GLUE defaults (AdamW, SAM, δ-SAM probe and logit, SSAM-F), as one job for a GPU machine.
#
#   benchmarks/glue_grid.sh OUT [PARALLEL] [GLUE_DIR]
#
# Every cell is one `samopt glue-compare` in its own folder under OUT, so the same command resumes what a time
# limit cut off; PARALLEL of them share the device (MiniLM is launch-bound: several processes keep a GPU busy).
# Tables: OUT/*/compare.md. On a 2-core CPU one full-size MRPC run of SAM takes about 15 minutes (issue 16).
set -euo pipefail
out=${1:?usage: benchmarks/glue_grid.sh OUT [PARALLEL] [GLUE_DIR]}
parallel=${2:-8}
glue=${3:-../shared/data/glue}
samopt=${SAMOPT:-samopt}
export HF_HUB_OFFLINE=1

cells=()
for task in mrpc rte; do
  dir=$glue/${task^^}
  cells+=("--task $task --data-dir $dir --optimizers adamw --out $out/$task-adamw")
  for rho in 0.005 0.01 0.02 0.05; do
    for opt in sam ssam-f delta-sam; do
      cells+=("--task $task --data-dir $dir --optimizers $opt --rho $rho --out $out/$task-$opt-rho$rho")
    done
  done
  # the full-size table at the defaults: delta-sam's two estimators
  cells+=("--task $task --data-dir $dir --optimizers delta-sam --estimator logit --out $out/$task-delta-logit")
done

printf '%s\n' "${cells[@]}" | xargs -P "$parallel" -I{} sh -c "$samopt glue-compare {} --seeds 3 --no-progress > /dev/null 2>&1 || echo 'failed: {}'"
for table in "$out"/*/compare.md; do
  echo "## $(basename "$(dirname "$table")")"
  cat "$table"
done
