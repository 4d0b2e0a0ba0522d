#!/usr/bin/env bash
# Build the environment if missing (with the test extras), check the wheel, then run the test suite.
#   ZEROSHOT_ILD_SKIP_WHEEL=1 scripts/test.sh -k cli     skip the wheel check (local runs)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
if [ "${ZEROSHOT_ILD_SKIP_WHEEL:-0}" != 1 ]; then
  bash scripts/check_wheel.sh
fi
exec .venv/bin/python -m pytest -q "$@"
