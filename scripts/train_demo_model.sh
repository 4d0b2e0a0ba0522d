#!/usr/bin/env bash
# Recreate ZeroShotILDLib/weights/phantom_demo.safetensors (the `zeroshot-ild demo` model) and its
# benchmark (training/RESULTS.md). CPU only, about 30-40 minutes on 2 cores. The work folder holds
# synthetic reports and caches; it is not part of the repository.
#
#   scripts/train_demo_model.sh [WORK_DIR]      (default: /tmp/zeroshot-ild-demo-model)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-/tmp/zeroshot-ild-demo-model}"
PY="${PYTHON:-.venv/bin/python}"

# Stage 1 data: 120 phantoms (cohort seed 20240, two resolutions) -> single-patch pairs (inside vs
# outside the disease mask) and montage pairs with the phantom reports.
"$PY" -m training.demo_model build --out "$WORK/pairs" --phantoms 120 --seed 20240
# Stage 1: DAPT (Lightning, UniCL on (ild, no ild)) from seeded random weights.
"$PY" -m training.demo_model train --pairs "$WORK/pairs" --out "$WORK/stage1" \
    --steps 400 --batch-size 32 --lr 5e-4 --loss unicl --seed 0 --weights "$WORK/stage1.safetensors"
# Stage 2 data: 60 new phantoms (seed 20241); montages retrieved by the stage-1 model itself
# (its hardest negatives), with the reports.
"$PY" -m training.demo_model build --out "$WORK/pairs2" --phantoms 60 --seed 20241 \
    --retrieval-model "dapt:$WORK/stage1.safetensors"
# Stage 2: continue from stage 1 on both sets; the 180 stage-2 montages are listed three times
# (oversampled) so that they are ~20 % of what the montage classifier sees.
"$PY" -m training.demo_model train --pairs "$WORK/pairs" "$WORK/pairs2" "$WORK/pairs2" "$WORK/pairs2" \
    --init "$WORK/stage1.safetensors" --out "$WORK/stage2" \
    --steps 200 --batch-size 32 --lr 2e-4 --loss unicl --seed 0 \
    --weights ZeroShotILDLib/weights/phantom_demo.safetensors
# Benchmark: 40 fresh phantoms (cohort seed 777, never used in training), engine defaults.
"$PY" -m training.demo_model evaluate --model dapt:ZeroShotILDLib/weights/phantom_demo.safetensors \
    --phantoms 40 --seed 777 --out "$WORK/eval.json"
