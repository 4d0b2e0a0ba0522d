#!/usr/bin/env bash
# Build the environment if missing, then run the offline demo into demo_out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/zeroshot-ild demo --out demo_out "$@"
