#!/usr/bin/env bash
# Build the environment if missing (with the test extras), check the wheel, then run the test suite.
#   ZEROSHOT_ILD_SKIP_WHEEL=1 scripts/test.sh -k cli     skip the wheel check (local runs)
# Without arguments (what CI runs) the suite is followed by the lanes on Slicer's Pythons,
# scripts/test_lane.sh 3.9 and 3.12 (each its own venv, ~4 min to build the first time); with
# pytest arguments, or ZEROSHOT_ILD_LANES=0, only the suite runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
if [ "${ZEROSHOT_ILD_SKIP_WHEEL:-0}" != 1 ]; then
  bash scripts/check_wheel.sh
fi
if [ $# -gt 0 ] || [ "${ZEROSHOT_ILD_LANES:-1}" = 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
status=0
.venv/bin/python -m pytest -q || status=$?
for lane in 3.9 3.12; do
  bash scripts/test_lane.sh "$lane" || { echo "lane $lane failed" >&2; status=1; }
done
exit $status
