"""The Slicer-facing model list and requirements file, read without importing torch.

The module must list the models (and say how to obtain their weights) before torch is installed,
so it cannot import ``ZeroShotILDLib.models``. It reads ``Resources/models.json`` instead, which
holds the same content as the engine's ``ZeroShotILDLib/model_list.json`` (a CI test keeps the two
equal).
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Optional

#: The "model" choice that means "the checkpoint file given in checkpointPath".
CUSTOM_MODEL = "custom checkpoint…"
#: The "model" choice that means "the ensemble.json given in checkpointPath" (engine: ensemble:<file>).
ENSEMBLE_MODEL = "ensemble of checkpoints…"
WEIGHTS_ENV = "ZEROSHOT_ILD_WEIGHTS"

_HERE = Path(__file__).resolve().parent


def resource_path(name: str) -> Path:
    """A file of the extension's ``Resources/`` folder.

    Installed, CMake copies the files next to the module's own resources
    (``qt-scripted-modules/Resources``); in a source checkout they sit in the repository's
    ``Resources/``. The first that exists wins.
    """
    candidates = [_HERE.parent / "Resources" / name, _HERE.parents[1] / "Resources" / name]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{name} not found in {', '.join(str(c.parent) for c in candidates)}")


def load_models(path: Optional[os.PathLike] = None) -> list[dict]:
    """The model records (name, description, architecture, source, licence, sha256, how_to_obtain).

    The panel asks for them on every parameter change (each keystroke in a text field), so the file
    is parsed once and read again only when it changes on disk.
    """
    file = Path(path or resource_path("models.json")).resolve()
    stat = file.stat()
    return [dict(m) for m in _parse_models(str(file), stat.st_mtime_ns, stat.st_size)]


@lru_cache(maxsize=4)
def _parse_models(path: str, mtime_ns: int, size: int) -> tuple:
    return tuple(json.loads(Path(path).read_text(encoding="utf-8"))["models"])


def model_names(path: Optional[os.PathLike] = None) -> list[str]:
    return [m["name"] for m in load_models(path)]


def model_record(name: str, path: Optional[os.PathLike] = None) -> Optional[dict]:
    for record in load_models(path):
        if record["name"] == name:
            return record
    return None


def default_weights_dir() -> Path:
    """The user cache folder for weights: $ZEROSHOT_ILD_WEIGHTS, else $XDG_CACHE_HOME/zeroshot-ild/weights.

    Mirrors ``ZeroShotILDLib.models.default_weights_dir`` (tested equal) so that the panel can show the
    folder before torch is installed.
    """
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "zeroshot-ild" / "weights"


def describe_model(name: str, weights_dir: Optional[str] = None) -> str:
    """Plain text for the panel: what the model is, its licence and how to get its weights."""
    if name == CUSTOM_MODEL:
        return ("A checkpoint written by training/ (DAPT, .safetensors with ZeroShotILD metadata). "
                "Pick the file below.")
    if name == ENSEMBLE_MODEL:
        return ("The best checkpoints of a training run (its ensemble.json): patches from the best one, "
                "finding and subtype probabilities averaged over all. Pick the ensemble.json below.")
    record = model_record(name)
    if record is None:
        return f"'{name}' is not in the model list."
    folder = str(Path(weights_dir).expanduser()) if weights_dir else str(default_weights_dir())
    lines = [record.get("description", "")]
    if record.get("licence"):
        lines.append(f"Licence: {record['licence']}.")
    if record.get("source") == "random":
        lines.append("Random weights: for testing only, its scores are meaningless.")
    elif record.get("trained_on") == "phantoms":
        lines.append("Trained on synthetic phantoms only: its scores on a real scan are meaningless.")
    elif record.get("download"):
        lines.append("Weights: Apply offers to download them when they are missing (openly licensed, checked). "
                     "Offline: " + record.get("how_to_obtain", "").format(weights_dir=folder))
    elif record.get("how_to_obtain"):
        lines.append("Weights: " + record["how_to_obtain"].format(weights_dir=folder))
    return "\n".join(line for line in lines if line)


def input_warning(name: str, volume_array=None) -> str:
    """The engine's one-line warning for ``name`` on a volume whose voxels are ``volume_array`` ("" if none).

    Shown in the panel before Apply; the same rule (``ZeroShotILDLib.results.model_warning``) marks
    the result, its tables and its saved notes after the run. Whether the volume is a phantom is
    read from its voxels (the generator's signature), never from its name; without the array it
    counts as a real scan.
    """
    from ZeroShotILDLib.phantom_signature import carries_signature
    from ZeroShotILDLib.results import model_warning

    record = model_record(name)
    if record is None:
        return ""
    is_phantom = volume_array is not None and carries_signature(volume_array)
    return model_warning(name, random_weights=record.get("source") == "random",
                         trained_on=record.get("trained_on", ""), is_phantom=is_phantom)


def requirements(path: Optional[os.PathLike] = None) -> list[str]:
    """Requirement lines of ``Resources/requirements.txt`` (comments and pip options dropped)."""
    text = Path(path or resource_path("requirements.txt")).read_text(encoding="utf-8")
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out.append(line)
    return out
