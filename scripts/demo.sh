#!/usr/bin/env bash
# Build the environment if missing (the package only, no test or training extras), then run the
# offline demo into demo_out/. ZEROSHOT_ILD_TORCH=cpu installs PyTorch's CPU-only build (see setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
exec .venv/bin/zeroshot-ild demo --out demo_out "$@"
