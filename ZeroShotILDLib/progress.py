"""Progress reporting and cooperative cancellation shared by the CLI, Slicer and training.

The pipeline calls ``progress(stage, done, total)`` between units of work and checks
``cancel.raise_if_cancelled()`` at the same points, so a cancel takes effect within one batch.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional

from .errors import Cancelled

#: ``progress(stage_name, done_units, total_units)``; total 0 means "unknown".
ProgressCallback = Callable[[str, int, int], None]


def no_progress(stage: str, done: int, total: int) -> None:
    """Default callback: report nothing."""


class CancelToken:
    """A thread-safe flag the UI sets and the worker polls."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


def resolve(progress: Optional[ProgressCallback], cancel: Optional[CancelToken]):
    """Return usable (progress, cancel) objects for optional arguments."""
    return progress or no_progress, cancel or CancelToken()
