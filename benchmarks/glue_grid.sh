#!/usr/bin/env bash
# The GLUE rho grid (SAM, SSAM-F, δ-SAM against AdamW on MRPC and RTE, 3 seeds) and the full-size table at the
# GLUE defaults (AdamW, SAM, δ-SAM probe and logit, SSAM-F), as one resumable job.
#
#   benchmarks/glue_grid.sh OUT [PARALLEL] [GLUE_DIR]
#
# Every cell is one `samopt glue-compare` in its own folder under OUT, so the same command resumes what a time
# limit cut off; PARALLEL of them run at once. It ends with the tables (benchmarks/glue_grid_table.py); each
# cell's own: OUT/*/compare.md.
#
# PROTOCOL=full (the default, for a GPU: MiniLM is launch-bound, so several processes keep it busy): the grid at
# full size, whose cells at the GLUE default rho are also the table's. PROTOCOL=cpu: the grid at the reduced protocol
# of docs/benchmarks.md (1,000 training pairs, batch 16, lr 1e-4), then the table's runs at full size in
# OUT/T-full-*, one thread per process (PARALLEL defaults to the number of cores). The table's rho is given
# explicitly (the runs' summaries record it), read from samopt.train.optimizers.GLUE_RHO. On a 2-core CPU a
# full-size MRPC run of SAM takes about 30 minutes, δ-SAM's probe estimator twice that.
set -euo pipefail
out=${1:?usage: [PROTOCOL=full|cpu] benchmarks/glue_grid.sh OUT [PARALLEL] [GLUE_DIR]}
glue=${3:-../shared/data/glue}
samopt=${SAMOPT:-samopt}
export HF_HUB_OFFLINE=1
case ${PROTOCOL:=full} in
  full) parallel=${2:-8}; grid="" ;;
  cpu) parallel=${2:-$(nproc)}; grid="--train-subset 1000 --batch-size 16 --lr 1e-4"; export OMP_NUM_THREADS=1 ;;
  *) echo "PROTOCOL must be full or cpu, got '$PROTOCOL'" >&2; exit 2 ;;
esac

default=$("${PYTHON:-python}" -c "from samopt.train.optimizers import GLUE_RHO; print(GLUE_RHO)")
cells=()
for task in mrpc rte; do
  dir=$glue/${task^^}
  cells+=("--task $task --data-dir $dir $grid --optimizers adamw --out $out/$task-adamw")
  for rho in 0.005 0.01 0.02 0.05; do
    for opt in sam ssam-f delta-sam; do
      cells+=("--task $task --data-dir $dir $grid --optimizers $opt --rho $rho --out $out/$task-$opt-rho$rho")
    done
  done
done
for task in mrpc rte; do
  dir=$glue/${task^^}
  if [ "$PROTOCOL" = cpu ]; then
    cells+=("--task $task --data-dir $dir --optimizers adamw --out $out/$task-full-adamw")
    cells+=("--task $task --data-dir $dir --optimizers sam,ssam-f,delta-sam --rho $default --out $out/$task-full-rho$default")
  fi
  cells+=("--task $task --data-dir $dir --optimizers delta-sam --estimator logit --rho $default --out $out/$task-full-logit-rho$default")
done

printf '%s\n' "${cells[@]}" | xargs -P "$parallel" -I{} sh -c "$samopt glue-compare {} --seeds 3 --no-progress > /dev/null 2>&1 || echo 'failed: {}'"
"${PYTHON:-python}" "$(dirname "$0")/glue_grid_table.py" "$out"
