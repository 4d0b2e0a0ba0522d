#!/usr/bin/env bash
# Build the environment (.venv in the clone) if it is missing or stale. Idempotent.
# Installs the exact tested versions of requirements/constraints.txt; the stamp covers that file and
# pyproject.toml, so changing either rebuilds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
constraints=requirements/constraints.txt
stamp=.venv/.installed-$(cat pyproject.toml "$constraints" | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
  .venv/bin/python -m pip install --quiet -c "$constraints" -e '.[train,test,dicom]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
