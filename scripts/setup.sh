#!/usr/bin/env bash
# Build the environment (.venv in the clone) if it is missing or stale. Idempotent.
#
#   scripts/setup.sh          what the demo and `zeroshot-ild` need (the package and its dependencies)
#   scripts/setup.sh test     adds the extras the test suite needs: train, test, dicom, pdf
#
# One variable chooses the torch build:
#   ZEROSHOT_ILD_TORCH=cpu    PyTorch's CPU-only wheels (download.pytorch.org/whl/cpu): no CUDA
#                             libraries, a venv of ~1.5 GB instead of ~5.5-7 GB. For machines
#                             without an NVIDIA GPU. Not exercised in CI (that index is not reachable
#                             from the CI machines); the rest of the install is the same.
#   unset (default)           torch from PyPI, which on Linux bundles the CUDA libraries.
#
# Exact versions come from requirements/constraints.txt (the set the suite passed with); the stamp
# covers that file, pyproject.toml and the torch choice, so changing any of them reinstalls.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
profile=${1:-demo}
case "$profile" in
  demo) extras="" ;;
  test) extras="[train,test,dicom,pdf]" ;;
  *) echo "setup.sh: unknown profile '$profile' (use: demo, test)" >&2; exit 2 ;;
esac
torch_build=${ZEROSHOT_ILD_TORCH:-default}
case "$torch_build" in
  default|cpu) ;;
  *) echo "setup.sh: ZEROSHOT_ILD_TORCH='$torch_build' is not 'cpu' (or unset)" >&2; exit 2 ;;
esac
constraints=requirements/constraints.txt
key=$( (cat pyproject.toml "$constraints"; echo "$torch_build") | sha1sum | cut -c1-12)
stamp=.venv/.installed-$key-$profile
# The test environment holds everything the demo needs.
if [ -f "$stamp" ] || { [ "$profile" = demo ] && [ -f ".venv/.installed-$key-test" ]; }; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
if [ "$torch_build" = cpu ]; then
  # The constraints pin torch==X and torchvision==Y; PyTorch's CPU wheels (X+cpu) satisfy them, and the
  # nvidia-*/triton lines only constrain, so nothing CUDA is installed.
  .venv/bin/python -m pip install --quiet -c "$constraints" --index-url https://download.pytorch.org/whl/cpu \
    torch torchvision
fi
.venv/bin/python -m pip install --quiet -c "$constraints" -e ".$extras"
rm -f .venv/.installed-*
touch "$stamp"
