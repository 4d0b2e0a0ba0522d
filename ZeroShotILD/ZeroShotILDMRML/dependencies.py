"""Which Python packages the engine still needs in Slicer, and how to install them safely.

Slicer ships its own numpy and SimpleITK (with Slicer-specific IO), and torch comes from the
PyTorch extension, built for the user's GPU. pip must never replace any of them: the packages in
``Resources/requirements.txt`` are installed with a constraints file that pins whatever versions
of those are installed, so pip either keeps them or fails instead of swapping them out. This file
only decides and describes; asking the user and running pip happens in the module's logic.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

#: Packages Slicer (or the PyTorch extension) provides and pip must leave alone.
PROTECTED = ("torch", "torchvision", "numpy", "SimpleITK")
TORCH_REQUIREMENT = ">=2.1"
TORCHVISION_REQUIREMENT = ">=0.16"

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def installed_version(name: str) -> Optional[str]:
    """Version of an installed distribution, or None (names compared as pip does: case, -/_ folded)."""
    candidates = {name, name.replace("_", "-"), name.replace("-", "_"), name.lower()}
    for candidate in candidates:
        try:
            return importlib.metadata.version(candidate)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _satisfies(version: str, specifier: str) -> bool:
    if not specifier:
        return True
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
    except ImportError:  # no packaging: presence is the best we can check
        return True
    return Version(version) in SpecifierSet(specifier)


def split_requirement(requirement: str) -> tuple[str, str]:
    """("open_clip_torch", ">=3.0") from "open_clip_torch>=3.0"."""
    match = _NAME.match(requirement.split(";", 1)[0])
    if not match:
        raise ValueError(f"cannot parse requirement {requirement!r}")
    return match.group(1), match.group(3).strip()


def missing_requirements(requirements: Sequence[str],
                         version_of: Callable[[str], Optional[str]] = installed_version) -> list[str]:
    """The requirements that are not installed or whose installed version does not satisfy them."""
    missing = []
    for requirement in requirements:
        name, specifier = split_requirement(requirement)
        version = version_of(name)
        if version is None or not _satisfies(version, specifier):
            missing.append(requirement)
    return missing


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def constraints_text(protected: Sequence[str] = PROTECTED,
                     version_of: Callable[[str], Optional[str]] = installed_version) -> str:
    """pip constraints pinning every installed protected package to its current version."""
    lines = ["# Written by ZeroShotILD: keep Slicer's own packages as they are."]
    for name in protected:
        version = version_of(name)
        if version is not None:
            lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def write_constraints(folder, **kwargs) -> Path:
    path = Path(folder) / "zeroshot-ild-constraints.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(constraints_text(**kwargs), encoding="utf-8")
    return path


def pip_arguments(requirements: Sequence[str], constraints_path) -> list[str]:
    """Arguments for ``slicer.util.pip_install`` (a list, so paths with spaces stay one argument)."""
    return [*requirements, "-c", str(constraints_path)]


def describe_install(missing: Sequence[str], need_torch: bool) -> str:
    """The list shown in the confirmation dialog."""
    items = []
    if need_torch:
        items.append(f"PyTorch {TORCH_REQUIREMENT} (through the PyTorch extension, CPU or CUDA build for this computer)")
    items.extend(missing)
    return "\n".join(f"- {item}" for item in items)
