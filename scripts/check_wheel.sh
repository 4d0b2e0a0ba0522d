#!/usr/bin/env bash
# Build the wheel and prove that it works installed, away from the source tree: install it into its
# own venv with the tested versions (requirements/constraints.txt, no extras) and run
#   zeroshot-ild demo, zeroshot-ild models, zeroshot-ild-train --help
# from outside the clone. Called by scripts/test.sh (and so by CI). The wheel venv (.venv-wheel/) is
# built once per constraints file and torch choice, from pip's cache; each run rebuilds and reinstalls
# only the wheel (--force-reinstall --no-deps), so a repeat run takes seconds plus the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
constraints=$REPO/requirements/constraints.txt
venv=${ZEROSHOT_ILD_WHEEL_VENV:-$REPO/.venv-wheel}
work=$(mktemp -d "${TMPDIR:-/tmp}/zeroshot-ild-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "check_wheel: building the wheel" >&2
# The dev venv's setuptools builds it when it satisfies pyproject's build requirement (a Python 3.11
# venv ships one); otherwise pip fetches setuptools into an isolated build environment.
isolation=""
if .venv/bin/python -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null; then
  isolation=--no-build-isolation
fi
.venv/bin/python -m pip wheel --quiet --no-deps $isolation -w "$work/dist" . >/dev/null
wheel=$(ls "$work"/dist/zeroshot_ild-*.whl)

key=$( (cat "$constraints"; echo "${ZEROSHOT_ILD_TORCH:-default}") | sha1sum | cut -c1-12)
if [ ! -f "$venv/.deps-$key" ]; then
  echo "check_wheel: creating $venv (dependencies from pip's cache and the constraints)" >&2
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip >/dev/null
  if [ "${ZEROSHOT_ILD_TORCH:-default}" = cpu ]; then
    "$venv/bin/python" -m pip install --quiet -c "$constraints" --index-url https://download.pytorch.org/whl/cpu \
      torch torchvision
  fi
  "$venv/bin/python" -m pip install --quiet -c "$constraints" "$wheel"
  touch "$venv/.deps-$key"
fi
"$venv/bin/python" -m pip uninstall --quiet --yes jsonargparse 2>/dev/null || true
"$venv/bin/python" -m pip install --quiet --force-reinstall --no-deps "$wheel"
cd "$work"  # nothing of the source tree is importable from here
export ZEROSHOT_ILD_WEIGHTS="$work/weights" ZEROSHOT_ILD_HASH_MEMO=""
# Without the [train] extra, zeroshot-ild-train must say so in one line (not a traceback).
if "$venv/bin/zeroshot-ild-train" --help > bare-train.txt 2>&1 \
    || [ "$(wc -l < bare-train.txt)" -ne 1 ] || ! grep -q "zeroshot-ild\[train\]" bare-train.txt; then
  cat bare-train.txt; echo "check_wheel: zeroshot-ild-train without the [train] extra gave no one-line hint" >&2; exit 1
fi
# zeroshot-ild-train's parser is jsonargparse's, from the [train] extra (pure Python, PyYAML only): the
# `zeroshot-ild-train --help` below needs it, the rest of that extra (Lightning, ...) it does not.
"$venv/bin/python" -m pip install --quiet -c "$constraints" jsonargparse

echo "check_wheel: zeroshot-ild --version / models / demo / zeroshot-ild-train --help from the wheel" >&2
"$venv/bin/zeroshot-ild" --version
"$venv/bin/python" - <<'PY'
import ZeroShotILDLib, zeroshot_ild_train, sys
for mod in (ZeroShotILDLib, zeroshot_ild_train):
    if "site-packages" not in (mod.__file__ or ""):
        sys.exit(f"check_wheel: {mod.__name__} imported from {mod.__file__}, not from the installed wheel")
PY
"$venv/bin/zeroshot-ild" models --no-hash > models.txt
grep -q "phantom-demo .* weights: found" models.txt || { cat models.txt; echo "check_wheel: demo weights missing from the wheel" >&2; exit 1; }
"$venv/bin/zeroshot-ild" models --json > models.json
"$venv/bin/zeroshot-ild-train" --help > train-help.txt
"$venv/bin/zeroshot-ild-train" --version
"$venv/bin/zeroshot-ild" -q demo -o demo_out > demo.txt
for f in result.json patches.csv montage.png heatmap.nii.gz lung_mask.nii.gz overlay.png report.html; do
  [ -s "demo_out/$f" ] || { echo "check_wheel: demo did not write $f" >&2; exit 1; }
done
echo "check_wheel: ok ($(basename "$wheel"))" >&2
