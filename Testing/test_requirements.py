"""One source for the dependencies: pyproject ranges, the tested constraints, Slicer's requirements.txt, the imports."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO

tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")

#: What Slicer ships (numpy, SimpleITK) or the PyTorch extension installs (torch, torchvision).
SLICER_PROVIDES = {"torch", "torchvision", "numpy", "simpleitk"}
#: Needed at run time without being imported by name (open_clip's image transforms use torchvision).
INDIRECT = {"torchvision"}


def _project():
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _requirements(lines):
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


def _imports(folder):
    """Top-level names of every module imported anywhere in ``folder``'s Python files (nested imports too)."""
    names = set()
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"ZeroShotILDLib", "zeroshot_ild_train", "training", "__future__"}


def _distributions(import_names):
    by_module = importlib.metadata.packages_distributions()
    out = {}
    for name in import_names:
        assert name in by_module, f"{name} is imported but no installed distribution provides it"
        out[name] = {canonicalize_name(d) for d in by_module[name]}
    return out


def test_library_dependencies_are_ranges_not_pins():
    project = _project()
    for line in project["dependencies"] + [x for v in project["optional-dependencies"].values() for x in v]:
        spec = Requirement(line).specifier
        assert not any(s.operator in ("==", "===") for s in spec), f"{line}: pin it in requirements/constraints.txt"
        assert any(s.operator in ("<", "<=", "~=") for s in spec) and any(s.operator in (">=", "~=") for s in spec), \
            f"{line}: give a lower and an upper bound"


def test_engine_imports_are_declared_and_declarations_are_imported():
    # The "dicom" and "pdf" extras: imported only where DICOM results / report.pdf are written, and only when installed.
    extras = _project()["optional-dependencies"]
    declared = _requirements(_project()["dependencies"] + extras["dicom"] + extras["pdf"])
    imported = _distributions(_imports(REPO / "ZeroShotILDLib"))
    for module, dists in imported.items():
        assert dists & set(declared), f"ZeroShotILDLib imports {module} ({sorted(dists)}) but pyproject does not declare it"
    used = set().union(*imported.values()) | INDIRECT
    assert set(declared) <= used, f"declared but never imported by the engine: {sorted(set(declared) - used)}"


def test_training_imports_are_declared():
    project = _project()
    declared = _requirements(project["dependencies"] + project["optional-dependencies"]["train"])
    for module, dists in _distributions(_imports(REPO / "training")).items():
        assert dists & set(declared), f"training imports {module} ({sorted(dists)}) but pyproject does not declare it"


def test_slicer_requirements_are_pyproject_minus_what_slicer_ships():
    sys.path.insert(0, str(REPO / "ZeroShotILD"))
    from ZeroShotILDMRML import catalog, dependencies

    # Pinned in the install's constraints: what Slicer ships (scipy and vtk too) and the PyTorch
    # extension's torch; scipy is also listed, since the engine imports it, and the pin keeps Slicer's.
    assert SLICER_PROVIDES | {"scipy", "vtk"} <= {canonicalize_name(n) for n in dependencies.PROTECTED}
    slicer = _requirements(catalog.requirements(REPO / "Resources" / "requirements.txt"))
    expected = {k: v for k, v in _requirements(_project()["dependencies"]).items() if k not in SLICER_PROVIDES}
    assert set(slicer) == set(expected), "Resources/requirements.txt and pyproject.toml list different packages"
    for name, req in slicer.items():
        assert req.specifier == expected[name].specifier, f"{name}: {req.specifier} in Slicer vs {expected[name].specifier}"


def test_constraints_pin_every_dependency_within_its_range():
    text = (REPO / "requirements" / "constraints.txt").read_text(encoding="utf-8")
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    project = _project()
    lines = project["dependencies"] + [x for v in project["optional-dependencies"].values() for x in v]
    for req in map(Requirement, lines):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} has no tested version in requirements/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req.specifier}"
    assert "scikit-image" not in pins


def test_setup_installs_with_the_constraints_and_stamps_them():
    script = (REPO / "scripts" / "setup.sh").read_text(encoding="utf-8")
    assert re.search(r"pip install .*-c \"\$constraints\"", script)
    assert re.search(r"key=.*pyproject\.toml.*\$constraints", script) and re.search(r"stamp=.*\$key", script)
    # One variable picks PyTorch's CPU-only wheels; the demo profile installs no test or training extras.
    assert "ZEROSHOT_ILD_TORCH" in script and "download.pytorch.org/whl/cpu" in script
    assert re.search(r'demo\) extras=""', script) and "[train,test,dicom,pdf]" in script
    assert "constraints=requirements/constraints.txt" in script
