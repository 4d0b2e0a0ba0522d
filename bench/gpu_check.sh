#!/usr/bin/env bash
# The GPU check of issue 13, one prepared run of <= 5 minutes on a CUDA machine:
#   - end-to-end analyze() of the reference phantom (300x512x512, seed 11) in memory, by stage;
#   - encoding throughput of the engine's data path vs the encoder on pre-made synthetic batches;
#   - peak GPU memory (torch allocator peak and reserved).
# Writes Markdown to $OUT/gpu_check.md (or ./gpu_check.md) and prints it.
# Without a CUDA device it stops at once with one line and exit code 3.
#
# On the device machine, which lacks open_clip/ftfy/wcwidth/edt and cannot fetch, first carry the wheels
# (see bench/RESULTS.md, "GPU check, prepared"): a .whl/ folder next to this repository's root is
# installed into /tmp/site when present.
#
#   bash bench/gpu_check.sh            # PYTHON=python3 by default; TIME_LIMIT_S=290
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-.}"
LIMIT="${TIME_LIMIT_S:-290}"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >/dev/null 2>&1 || { echo "gpu_check: installing the carried wheels in .whl/ failed" >&2; exit 4; }
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is false, or torch is missing); nothing measured" >&2
  exit 3
fi

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
# One process: the model loads once; synthetic and engine sides alternate (best of 3), then the end-to-end run.
timeout "$LIMIT" "$PY" bench/bench_data_path.py --device cuda --end-to-end --repeats 3 --gpu-memory \
  --out "$OUT_DIR/gpu_check.md"
