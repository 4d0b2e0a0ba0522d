"""Which Python packages the engine still needs in Slicer, and how to install them safely.

Slicer ships its own Python packages (numpy, scipy, SimpleITK with Slicer-specific IO, vtk, the
packages of other extensions...) and torch comes from the PyTorch extension, built for the user's
GPU. pip must replace none of them: the packages in ``Resources/requirements.txt`` are installed
with a constraints file that pins every distribution installed in Slicer's Python at the moment
(read with ``importlib.metadata``), except those being installed, so pip either keeps them or
fails instead of swapping them out. An installed torch older than what open_clip needs is found
before pip runs, because pip would otherwise fail on the torch pin with a resolver message that
does not say what to do. This file only decides and describes; asking the user and running pip
happens in the module's logic.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from ZeroShotILDLib.errors import InputError

#: Packages Slicer (or the PyTorch extension) provides that must always be pinned when installed,
#: whatever else :func:`installed_distributions` finds.
PROTECTED = ("torch", "torchvision", "numpy", "scipy", "SimpleITK", "vtk")
#: open_clip_torch 3.x needs torch >= 2.0; the engine is tested from 2.1 on.
TORCH_REQUIREMENT = ">=2.1"
TORCHVISION_REQUIREMENT = ">=0.16"

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def canonical_name(name: str) -> str:
    """A distribution name as pip compares them (PEP 503: case and runs of -_. folded)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_distributions() -> dict:
    """{name: version} of every distribution installed in this Python (Slicer's own included)."""
    out = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata is not None else None
        if name and dist.version:
            out.setdefault(name, dist.version)
    return out


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


def _valid_version(version: str) -> bool:
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return True
    try:
        Version(version)
    except InvalidVersion:
        return False
    return True


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


def constraints_text(installed: Optional[dict] = None, installing: Iterable[str] = (),
                     version_of: Callable[[str], Optional[str]] = installed_version) -> str:
    """pip constraints pinning every installed distribution (default: all of this Python's) to its
    current version, except the ones named in ``installing`` (requirement strings or names).

    The ``PROTECTED`` packages are pinned even when ``installing`` names them: pip must never
    replace Slicer's torch, numpy or SimpleITK.
    """
    installed = dict(installed_distributions() if installed is None else installed)
    for name in PROTECTED:
        if not any(canonical_name(n) == canonical_name(name) for n in installed):
            version = version_of(name)
            if version is not None:
                installed[name] = version
    skip = {canonical_name(split_requirement(r)[0]) for r in installing} - {canonical_name(n) for n in PROTECTED}
    lines = ["# Written by ZeroShotILD: keep the packages of Slicer's Python as they are."]
    for name in sorted(installed, key=canonical_name):
        # pip refuses the whole file for one version it cannot parse (old egg-info installs).
        if canonical_name(name) not in skip and _valid_version(installed[name]):
            lines.append(f"{name}=={installed[name]}")
    return "\n".join(lines) + "\n"


def check_torch(version_of: Callable[[str], Optional[str]] = installed_version) -> None:
    """Raise ``InputError`` when an installed torch is older than open_clip needs (before pip runs)."""
    version = version_of("torch")
    if version is not None and not _satisfies(version, TORCH_REQUIREMENT):
        raise InputError(f"Slicer's PyTorch {version} is older than ZeroShotILD needs (torch{TORCH_REQUIREMENT}, "
                         "for open_clip): update it in the 'PyTorch Util' module (uninstall, then install), "
                         "restart Slicer and press Apply again")


def write_constraints(folder, **kwargs) -> Path:
    from ZeroShotILDLib.atomic_files import atomic_write_text

    path = Path(folder) / "zeroshot-ild-constraints.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, constraints_text(**kwargs))
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
