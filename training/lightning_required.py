"""Lightning, imported once for every DAPT module, with the one-line answer when it is not installed.

The engine installs without the ``train`` extra; a user who runs training there gets the pip line
instead of a traceback, whichever DAPT module is imported first.
"""
from __future__ import annotations

from ZeroShotILDLib.errors import InputError

try:
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
except ImportError:  # pragma: no cover - depends on the installation
    raise InputError("training needs the optional dependencies: pip install 'zeroshot-ild[train]'") from None

__all__ = ["L", "EarlyStopping", "ModelCheckpoint", "CSVLogger"]
