"""JSON files of a DAPT run (summary, ensemble, sweep): tensors, numpy scalars and paths made plain."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .files import atomic_write_text


def jsonable(value):
    """``value`` with tensors, numpy scalars and paths as plain Python values, containers walked."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, payload: dict) -> Path:
    """``payload`` as JSON at ``path``, written atomically (a crash never leaves half a file)."""
    from ZeroShotILDLib.outputs import json_text

    # A diverged run's NaN loss is written as null: bare NaN is not JSON for any other reader.
    return atomic_write_text(path, json_text(jsonable(payload), notes_key=None))
