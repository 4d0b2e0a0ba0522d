"""Writing files so that a crash, a full disk or a kill never leaves a half-written one under its name.

One helper for every writer in the project (engine outputs, checkpoints, caches, training files):
the bytes go to a temporary file beside the destination (same file system, so the final rename is
atomic) and are renamed into place only once they are complete. The temporary file gets the mode a
plain ``open()`` would give (``0o666`` less the umask): ``mkstemp`` alone creates ``0o600``, which
hides results from colleagues on a shared workstation.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

#: Suffix of temporary files; a reader or a cleaner can recognise leftovers of a killed writer by it.
PARTIAL_SUFFIX = ".partial"


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file under the current umask."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    For writers that want a file name rather than a handle (``safetensors.save_file``,
    ``SimpleITK.WriteImage``, ``numpy.savez``). On any exception the temporary file is removed and
    ``path`` is untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, default_file_mode())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8, whatever the locale: slicer-core sets the C locale) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))
