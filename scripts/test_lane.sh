#!/usr/bin/env bash
# A test lane on the Python of a Slicer release: its own venv, its own exact versions, a subset of the suite.
#
#   scripts/test_lane.sh 3.9     Slicer 5.6 / 5.8 (Python 3.9): .venv-py39, requirements/constraints-py39.txt
#                                (numpy 1.26.4, scipy 1.13.1, pillow 10.3.0 as Slicer 5.8 ships; torch 2.8.0,
#                                the newest with Python 3.9 wheels)
#   scripts/test_lane.sh 3.12    Slicer 5.10 (Python 3.12): .venv-py312, requirements/constraints-py312.txt
#   scripts/test_lane.sh 3.9 -k worker     extra arguments go to pytest
#
# Runs the engine tests and the module's tests (worker protocol, static checks, and where slicer-core
# installs, i.e. on 3.10+, the MRML, panel, light-process and rendering tests); not the training tests
# (Lightning, DDP: long, and not what Slicer runs). Measured times: bench/RESULTS.md. Before the tests, every module of the engine, the
# Slicer module and training/ is compiled with the lane's Python (syntax it does not know fails here).
# The interpreter: $ZEROSHOT_ILD_PYTHON_3_9 (or _3_12), else pythonX.Y on PATH, else pyenv's newest X.Y.
# torch comes from PyPI (bundles CUDA libraries; PyTorch's CPU index is not reachable from CI).
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: scripts/test_lane.sh 3.9|3.12 [pytest args]}
shift
case "$version" in
  3.9) extras="" ; pip_extra="pytest jsonschema" ;;          # slicer-core has no Python 3.9 wheels
  3.12) extras="[test,dicom]" ; pip_extra="" ;;
  *) echo "test_lane.sh: no lane for Python '$version' (use 3.9 or 3.12)" >&2; exit 2 ;;
esac
tag=${version/./}
venv=.venv-py$tag
constraints=requirements/constraints-py$tag.txt

find_python() {
  local var="ZEROSHOT_ILD_PYTHON_${version/./_}" candidate
  if [ -n "${!var:-}" ]; then echo "${!var}"; return; fi
  # pyenv's shim for pythonX.Y is on the PATH even when that version is not selected: run each candidate.
  for candidate in "python$version" $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$version".*/bin/python 2>/dev/null | sort -V -r); do
    if "$candidate" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$version'.split('.'))))" 2>/dev/null; then
      command -v "$candidate"; return
    fi
  done
  return 1
}

start=$(date +%s)
key=$( (cat pyproject.toml "$constraints" "$0") | sha1sum | cut -c1-12)
stamp=$venv/.installed-$key
if [ ! -f "$stamp" ]; then
  if [ ! -x "$venv/bin/python" ]; then
    py=$(find_python) || { echo "test_lane.sh: no Python $version found (set ZEROSHOT_ILD_PYTHON_${version/./_}," \
      "or install it: pyenv install $version); ZEROSHOT_ILD_LANES=0 scripts/test.sh skips the lanes" >&2; exit 2; }
    "$py" -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install --quiet --upgrade pip >/dev/null
  # shellcheck disable=SC2086  # pip_extra is a list of names
  "$venv/bin/python" -m pip install --quiet -c "$constraints" -e ".$extras" $pip_extra
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
built=$(date +%s)
echo "lane $version: $("$venv/bin/python" -c 'import platform, numpy, scipy, torch; print("Python", platform.python_version(), "numpy", numpy.__version__, "scipy", scipy.__version__, "torch", torch.__version__)'), venv ready in $((built - start)) s"

"$venv/bin/python" - <<'EOF'
import pathlib, sys
bad = []
for folder in ("ZeroShotILDLib", "ZeroShotILD", "training"):
    for path in sorted(pathlib.Path(folder).rglob("*.py")):
        try:
            compile(path.read_text(encoding="utf-8"), str(path), "exec", dont_inherit=True)
        except SyntaxError as exc:
            bad.append(f"{path}:{exc.lineno}: {exc.msg}")
if bad:
    sys.exit("not valid Python %s:\n  " % sys.version.split()[0] + "\n  ".join(bad))
EOF

# Not here: the training tests, the packaging checks of the main venv (test_packaging, test_requirements),
# test_fast_fp32 (the slowest engine file, ~18 % of the 3.9 lane: the fp32 proposal pass's fidelity) and
# test_slicer_event_loop (~40 % of the 3.12 lane: the GIL-holding host's timings on a real CT); neither
# depends on the Python version, and the main suite runs both.
ENGINE_TESTS="body_mask calibration checkpoint_safety cli dicom_results embeddings ensemble exact_reprompt extent
  fast_mode geometry gpu_check interval_series lung_mask models outputs_safety patches patterns
  phantom pipeline report scan scoring summary weights_download"
files=()
for name in $ENGINE_TESTS; do files+=("Testing/test_$name.py"); done
for path in Testing/test_slicer_*.py; do
  [ "$path" = Testing/test_slicer_event_loop.py ] || files+=("$path")
done
status=0
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$venv/bin/python" -m pytest -q -p no:cacheprovider "${files[@]}" "$@" || status=$?
echo "lane $version: $(( $(date +%s) - built )) s of tests, $(( $(date +%s) - start )) s in all, exit $status"
exit $status
