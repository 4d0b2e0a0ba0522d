"""Writing files so that a crash never leaves a half-written one under the final name.

The helper lives in the engine (``ZeroShotILDLib.atomic_files``) so that every writer shares it.
"""
from __future__ import annotations

from ZeroShotILDLib.atomic_files import atomic_path, atomic_write_bytes, atomic_write_text

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text"]
