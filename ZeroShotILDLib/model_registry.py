"""The model registry, read without torch: names, weight files, where they are, whether they check out.

``model_list.json`` maps a model name to its architecture, weight source, preprocessing and, for
openly licensed weights, the hub repository and pinned revision they download from. Everything
here is plain Python (json, glob, hashlib) so that the command line can refuse an unknown model or
missing weights in well under a second, before torch, open_clip or the scan are touched;
``models`` builds networks from these records.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

from .errors import InputError

WEIGHTS_ENV = "ZEROSHOT_ILD_WEIGHTS"
_PACKAGE_DIR = Path(__file__).resolve().parent
_MODEL_LIST = _PACKAGE_DIR / "model_list.json"
_PACKAGE_WEIGHTS = _PACKAGE_DIR / "weights"


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the registry: what to build, where its weights come from, how to preprocess."""

    name: str
    architecture: str
    quick_gelu: bool
    source: str  # "file" | "local-dir" | "package" | "random" | "checkpoint"
    files: tuple[str, ...] = ()
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"
    description: str = ""
    licence: str = ""
    #: Published SHA-256 per weights file name (the registry's ``sha256`` object); empty when unknown.
    sha256: dict = field(default_factory=dict, compare=False, hash=False)
    how_to_obtain: str = ""
    #: "phantoms" for models that never saw a real CT: their scores on a real scan are meaningless.
    trained_on: str = ""
    #: The finding texts a model was trained to name (phantom-demo); empty = zero-shot, any text. The
    #: pattern map leaves out patterns outside this list: the model answers them at random.
    named_findings: tuple = ()
    model_cfg: Optional[dict] = field(default=None, compare=False, hash=False)
    #: Where ``zeroshot-ild models download`` fetches openly licensed weights (``weights_download``);
    #: None for weights a user must obtain by hand (CheXzero) or that need none.
    download: Optional[dict] = field(default=None, compare=False, hash=False)

    @property
    def meaningful(self) -> bool:
        """False for random-weight models whose scores say nothing about the scan."""
        return self.source != "random"

    @property
    def needs_weights(self) -> bool:
        """True when the model cannot run until a file is in the weights folder."""
        return self.source in ("file", "local-dir")


@lru_cache(maxsize=1)
def _registry() -> dict[str, ModelSpec]:
    data = json.loads(_MODEL_LIST.read_text(encoding="utf-8"))
    specs = {}
    for entry in data["models"]:
        entry = dict(entry)
        for key in ("files", "image_mean", "image_std", "named_findings"):
            entry[key] = tuple(entry.get(key) or ())
        entry["sha256"] = dict(entry.get("sha256") or {})
        specs[entry["name"]] = ModelSpec(**entry)
    return specs


def list_models() -> list[ModelSpec]:
    return list(_registry().values())


def model_names() -> list[str]:
    return list(_registry())


def get_spec(name: str) -> ModelSpec:
    try:
        return _registry()[name]
    except KeyError:
        raise InputError(
            f"unknown model '{name}': use one of {', '.join(model_names())}, dapt:<checkpoint> or a checkpoint path"
        ) from None


def default_weights_dir() -> Path:
    """The user cache folder for weights: $ZEROSHOT_ILD_WEIGHTS, else $XDG_CACHE_HOME/zeroshot-ild/weights."""
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "zeroshot-ild" / "weights"


def weights_root(weights_dir: Optional[os.PathLike] = None) -> Path:
    return Path(weights_dir).expanduser() if weights_dir else default_weights_dir()


def locate_weights(spec: ModelSpec, weights_dir: Path, package_dir: Optional[Path] = None) -> Optional[Path]:
    """The first file (or folder marker) matching the model's patterns, or None."""
    roots = [package_dir or _PACKAGE_WEIGHTS] if spec.source == "package" else [weights_dir]
    for pattern in spec.files:
        for root in roots:
            hits = sorted(glob.glob(str(root / pattern)))
            if hits:
                return Path(hits[0])
    return None


def missing_weights_message(spec: ModelSpec, weights_dir: Path, package_dir: Optional[Path] = None) -> str:
    roots = [package_dir or _PACKAGE_WEIGHTS] if spec.source == "package" else [weights_dir]
    where = roots[0] / (spec.files[0] if spec.files else spec.name)
    if spec.download:
        how = f"run `zeroshot-ild models download {spec.name}` (or " + \
              spec.how_to_obtain.format(weights_dir=weights_dir).rstrip(".") + ")"
    else:
        how = spec.how_to_obtain.format(weights_dir=weights_dir)
        if spec.name == "chexzero":
            how += " (`zeroshot-ild models download chexzero` prints the steps)"
    return f"weights for '{spec.name}' not found at {where}: {how}"


def find_weights(spec: ModelSpec, weights_dir: Path, package_dir: Optional[Path] = None) -> Path:
    found = locate_weights(spec, weights_dir, package_dir)
    if found is None:
        raise InputError(missing_weights_message(spec, weights_dir, package_dir))
    return found


def check_model_available(name: str, checkpoint: Optional[str] = None,
                          weights_dir: Optional[os.PathLike] = None) -> None:
    """Refuse, in one line and without torch, a model that cannot load: unknown name, missing weights.

    Checked before any scan is read. ``dapt:``/``ensemble:`` and checkpoint paths are checked for
    existence only (their content is checked by the loader).
    """
    if name.startswith(("dapt:", "ensemble:")) or (checkpoint is None and name.endswith(".safetensors")):
        path = Path(name.split(":", 1)[1] if name.startswith(("dapt:", "ensemble:")) else name).expanduser()
        if not path.is_file():
            raise InputError(f"checkpoint {path} does not exist: check the path")
        return
    spec = get_spec(name)
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise InputError(f"checkpoint {path} does not exist: check the path")
        return
    if spec.source in ("file", "local-dir", "package"):
        find_weights(spec, weights_root(weights_dir))


def weights_status(spec: ModelSpec, weights_dir: Path, *, hash_files: bool = True) -> dict:
    """What ``zeroshot-ild models`` reports for one model.

    ``state`` is ``not needed`` (random weights), ``found`` or ``missing``; ``checksum`` is ``ok``,
    ``MISMATCH``, ``unchecked`` (no published SHA-256 for this file) or ``not computed``.
    """
    out = {"name": spec.name, "architecture": spec.architecture, "licence": spec.licence,
           "downloadable": bool(spec.download), "meaningful": spec.meaningful, "path": None,
           "state": "not needed", "checksum": None, "sha256": None}
    if spec.source == "random":
        return out
    found = locate_weights(spec, weights_dir)
    if found is None:
        out["state"] = "missing"
        return out
    out["state"] = "found"
    out["path"] = str(found)
    expected = spec.sha256.get(found.name) if found.is_file() else None
    if not expected:
        out["checksum"] = "unchecked"
    elif not hash_files:
        out["checksum"] = "not computed"
    else:
        from .file_hashes import sha256_file

        digest = sha256_file(found)
        out["sha256"] = digest
        out["checksum"] = "ok" if digest == expected.lower() else "MISMATCH"
    return out
