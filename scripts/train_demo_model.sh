#!/usr/bin/env bash
# Recreate ZeroShotILDLib/weights/phantom_demo.safetensors (the `zeroshot-ild demo` model) and its
# benchmark (training/RESULTS.md). CPU only (one torch thread per process, as the shipped file was
# trained: two threads beside other work ran 15x slower), about 15-25 minutes on 2 cores. The work
# folder holds synthetic reports and caches; it is not part of the repository.
#
#   scripts/train_demo_model.sh [WORK_DIR [WEIGHTS]]
#       WORK_DIR default /tmp/zeroshot-ild-demo-model
#       WEIGHTS  default ZeroShotILDLib/weights/phantom_demo.safetensors. Give a path under WORK_DIR
#                to benchmark a retrained model before it replaces the committed one; a new file
#                also needs its SHA-256 in Resources/models.json (phantom-demo) and a new extent
#                reference (`zeroshot-ild calibrate`), or the registry refuses it.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-/tmp/zeroshot-ild-demo-model}"
WEIGHTS="${2:-ZeroShotILDLib/weights/phantom_demo.safetensors}"
PY="${PYTHON:-.venv/bin/python}"
DM=("$PY" -m zeroshot_ild_train.demo_model --threads 1)

# Data: 240 phantoms (cohort seed 20240; three resolutions; 60 % ILD, UIP-, NSIP- and HP-like
# balanced, 3-100 % of the lung involved; noise 8-40 HU; lung -880..-815 HU) -> single-patch pairs
# (boxes with >= 10 % lung; diseased = disease over >= half the box's lung, half of them the
# faintest, plus boxes on each pattern's region; disease-free boxes, a third at the pleura, a third
# the densest; half the captions the bare prompts) and montage pairs with the phantom reports.
"${DM[@]}" build --out "$WORK/pairs" --phantoms 240 --seed 20240
# 90 more (seed 20242) whose positives are all HP-like: the faintest style (patchy ground glass,
# dark lobules of mosaic attenuation) needs more examples than the fibrotic ones.
"${DM[@]}" build --out "$WORK/pairs_hp" --phantoms 90 --seed 20242 --subtype "hypersensitivity pneumonitis"
# DAPT (Lightning, UniCL with statement targets: a caption is a positive of every image it is true of,
# demo_model.pair_labels) from seeded random weights; the checkpoint with the
# lowest validation loss is exported in fp16.
"${DM[@]}" train --pairs "$WORK/pairs" "$WORK/pairs_hp" --out "$WORK/stage1" \
    --steps 3000 --batch-size 32 --lr 5e-4 --loss unicl --seed 0 --weights "$WEIGHTS"
# Benchmark: 40 fresh phantoms (cohort seed 777, never used in training; 3-100 % involved), engine
# defaults: patch AUROC per style and per pattern prompt, scan AUROC, 95 % CIs.
"${DM[@]}" evaluate --model "dapt:$WEIGHTS" --phantoms 40 --seed 777 --out "$WORK/eval.json"
