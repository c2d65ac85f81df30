#!/usr/bin/env bash
# Issue 20's GPU evidence in one run of under 8 minutes (device tool: `run`, timeout_s 560):
#   1. operators and host synchronisations per step on CUDA (benchmarks/step_cost.py --count);
#   2. epoch time per 5,000 synthetic CIFAR-sized images, batch 128, channels_last, epoch 2 of 2:
#      ResNet-18 in bf16 and in fp16 (GradScaler), WRN-28-10 in bf16; SGD, SAM, SSAM-F, SSAM-D;
#   3. the CUDA test run of the integrations, then the whole suite, with --tb=short.
# Everything is written under $OUT (or ./gpu-out); docs/benchmarks.md says how to read it.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
SAMOPT=${SAMOPT:-.venv/bin/samopt}
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
git rev-parse HEAD >> "$OUT/gpu.txt" 2>/dev/null

timeout 60 "$PY" benchmarks/step_cost.py --count --device cuda --workload resnet18 \
  --methods sgd,samopt-closure,samopt-two-phase,ssam-f-element,ssam-d-tensor,msam > "$OUT/count.txt" 2>&1

for run in "resnet18 bf16" "resnet18 fp16" "wrn28-10 bf16"; do
  set -- $run
  timeout 150 "$SAMOPT" compare --dataset synthetic --synthetic-size 5000 --model "$1" --amp "$2" \
    --channels-last --optimizers sgd,sam,ssam-f,ssam-d --epochs 2 --batch-size 128 --device cuda \
    --no-progress --out "$OUT/epochs-$1-$2" > "$OUT/epochs-$1-$2.txt" 2>&1
done

SAMOPT_TEST_DEVICE=cuda timeout 60 "$PY" -m pytest -q --tb=short -p no:cacheprovider tests/test_integrations.py \
  > "$OUT/pytest-integrations-cuda.txt" 2>&1
timeout 100 "$PY" -m pytest -q --tb=short -p no:cacheprovider -x tests > "$OUT/pytest-all.txt" 2>&1
tail -n 3 "$OUT"/*.txt
