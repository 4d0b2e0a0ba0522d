#!/usr/bin/env bash
# Build the environment if missing (with the test extras), check the wheel, then run the test suite.
#   ZEROSHOT_ILD_SKIP_WHEEL=1 scripts/test.sh -k cli     skip the wheel check (local runs)
# Without arguments (what CI runs) the suite is followed by the lanes on Slicer's Pythons,
# scripts/test_lane.sh 3.9 and 3.12 (each its own venv, ~4 min to build the first time); with
# pytest arguments, or ZEROSHOT_ILD_LANES=0, only the suite runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# The wheel check's venv and each lane's are ~7 GB (CUDA torch from PyPI). Where the disk has less than
# ZEROSHOT_ILD_MIN_FREE_GB (default 40) free after one is used, it is removed (rebuilt on the next run in
# 2-5 min): a shared CI disk once filled up with four venvs and the suite's test files.
# ZEROSHOT_ILD_KEEP_VENVS=1 keeps them whatever the space.
free_venv() {
  local venv=$1 free_gb
  [ "${ZEROSHOT_ILD_KEEP_VENVS:-0}" = 1 ] || [ ! -d "$venv" ] && return 0
  free_gb=$(df -Pk . | awk 'NR == 2 {print int($4 / 1048576)}')
  if [ "$free_gb" -lt "${ZEROSHOT_ILD_MIN_FREE_GB:-40}" ]; then
    rm -rf "$venv"
    echo "test.sh: removed $venv to save disk (${free_gb} GB were free; the next run rebuilds it)" >&2
  fi
}
if [ "${ZEROSHOT_ILD_SKIP_WHEEL:-0}" != 1 ]; then
  bash scripts/check_wheel.sh
  free_venv "${ZEROSHOT_ILD_WHEEL_VENV:-.venv-wheel}"
fi
if [ $# -gt 0 ] || [ "${ZEROSHOT_ILD_LANES:-1}" = 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
status=0
.venv/bin/python -m pytest -q || status=$?
for lane in 3.9 3.12; do
  bash scripts/test_lane.sh "$lane" || { echo "lane $lane failed" >&2; status=1; }
  free_venv ".venv-py${lane/./}"
done
exit $status
