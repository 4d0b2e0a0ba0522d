"""The wheel carries every data file the package reads (the full check, building and installing the
wheel and running the demo from it, is scripts/check_wheel.sh, which scripts/test.sh runs)."""
from __future__ import annotations

import fnmatch
import tomllib

from conftest import REPO


def test_every_data_file_of_the_engine_is_package_data():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    globs = project["tool"]["setuptools"]["package-data"]["ZeroShotILDLib"]
    package = REPO / "ZeroShotILDLib"
    data = [p.relative_to(package).as_posix() for p in package.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert "model_list.json" in data
    missing = [f for f in data if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"


def test_python_range_reaches_slicers_python_and_each_lane_has_its_exact_set():
    """Slicer 5.6/5.8 run Python 3.9: the package allows it; the main constraints (numpy 2.4.6, ...)
    need 3.11+, so the 3.9 and 3.12 lanes (scripts/test_lane.sh, run by scripts/test.sh) have their own."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["requires-python"] == ">=3.9"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "3.9" in readme and "scripts/test_lane.sh 3.9" in readme
    assert "test_lane.sh" in (REPO / "scripts" / "test.sh").read_text(encoding="utf-8")
    py39 = (REPO / "requirements" / "constraints-py39.txt").read_text(encoding="utf-8").split()
    for pin in ("numpy==1.26.4", "scipy==1.13.1", "pillow==10.3.0", "torch==2.8.0"):  # Slicer 5.8's, newest for 3.9
        assert pin in py39, pin
    assert "slicer-core==" in (REPO / "requirements" / "constraints-py312.txt").read_text(encoding="utf-8")


def test_ci_runs_the_wheel_check_through_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    test = (REPO / "scripts" / "test.sh").read_text(encoding="utf-8")
    assert "scripts/test.sh" in ci and "scripts/check_wheel.sh" in test
    check = (REPO / "scripts" / "check_wheel.sh").read_text(encoding="utf-8")
    for command in ("zeroshot-ild\" -q demo", "zeroshot-ild\" models", "zeroshot-ild-train\" --help"):
        assert command in check, command
