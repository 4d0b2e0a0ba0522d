"""Content hashes of files, computed once per version of a file and remembered by its stat.

Caches (patch embeddings, training montages) and weight checks key on what a file contains, not
on its name or modification time: two checkpoints of the same size whose mtime was set alike, or
a scan id pointed at a new file, must never share an entry. Hashing a 600 MB checkpoint on every
run would cost seconds, so a hash is remembered under the file's identity on disk (resolved path,
size, mtime and ctime in nanoseconds, inode, device) in memory and in a small JSON memo in the
user cache folder. ``ctime`` cannot be set from user space (``os.utime`` sets only atime and
mtime), so rewriting a file in place and restoring its mtime still changes the key.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Optional

from .atomic_files import atomic_write_text

log = logging.getLogger(__name__)

#: Where the memo lives (override for tests or read-only homes); "" disables the file memo.
MEMO_ENV = "ZEROSHOT_ILD_HASH_MEMO"
_MEMO_LIMIT = 20000
_CHUNK = 1 << 20
_SAVE_EVERY_S = 2.0
_last_save = float("-inf")

_lock = threading.Lock()
_memory: dict[str, tuple[tuple, str]] = {}
_disk_loaded_from: Optional[Path] = None


def memo_path() -> Optional[Path]:
    env = os.environ.get(MEMO_ENV)
    if env is not None:
        return Path(env).expanduser() if env else None
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "zeroshot-ild" / "file-hashes.json"


def _identity(path: Path) -> tuple[str, tuple]:
    resolved = path.resolve()
    st = resolved.stat()
    return str(resolved), (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _load_disk_memo() -> None:
    global _disk_loaded_from
    path = memo_path()
    if path is None or _disk_loaded_from == path:
        return
    _disk_loaded_from = path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        for name, (stat, digest) in data.get("files", {}).items():
            _memory.setdefault(name, (tuple(stat), str(digest)))
    except FileNotFoundError:
        pass
    except (OSError, ValueError, TypeError, AttributeError):
        # A damaged memo only costs re-hashing; it is rewritten on the next hash.
        log.debug("ignoring unreadable hash memo %s", path)


def _save_disk_memo() -> None:
    path = memo_path()
    if path is None:
        return
    items = list(_memory.items())[-_MEMO_LIMIT:]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"format": "zeroshot-ild-file-hashes/1",
                                            "files": {k: [list(s), d] for k, (s, d) in items}}))
    except OSError:
        log.debug("could not write hash memo %s", path)


def sha256_file(path: os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, hashed only when this version of the file is new to the memo."""
    name, stat = _identity(Path(path))
    # A file changed while it was read must not be remembered under the stat it had before.
    return _memoised(name, stat, lambda: _hash_bytes(name), still=lambda: _identity(Path(name))[1] == stat)


def sha256_path(path: os.PathLike) -> str:
    """Hash of a file, or of a folder (a DICOM series): its relative file names and their bytes.

    A folder is remembered as one memo entry keyed by the stat of every file in it, so a cohort
    of thousands of series costs a directory listing per series once hashed.
    """
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = hashlib.sha256()
    for child in files:
        listing.update(repr((child.relative_to(path).as_posix(), _identity(child)[1])).encode("utf-8"))
    name = str(path.resolve()) + os.sep

    def folder_hash() -> str:
        digest = hashlib.sha256()
        for child in files:
            digest.update(child.relative_to(path).as_posix().encode("utf-8") + b"\0")
            digest.update(_hash_bytes(child).encode("ascii"))
        return digest.hexdigest()

    return _memoised(name, (listing.hexdigest(),), folder_hash)


def _hash_bytes(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _memoised(name: str, stat: tuple, compute, still=None) -> str:
    global _last_save
    with _lock:
        _load_disk_memo()
        known = _memory.get(name)
        if known is not None and known[0] == stat:
            return known[1]
    value = compute()
    with _lock:
        if still is None or still():
            _memory.pop(name, None)
            _memory[name] = (stat, value)
            # Written at most every few seconds while a cohort is hashed, and once more at exit.
            if time.monotonic() - _last_save > _SAVE_EVERY_S:
                _save_disk_memo()
                _last_save = time.monotonic()
            else:
                _pending_exit_save()
    return value


_exit_hook = []


def _pending_exit_save() -> None:
    if not _exit_hook:
        _exit_hook.append(True)
        atexit.register(lambda: _save_disk_memo())


def flush() -> None:
    """Write the memo now (it is otherwise written every few seconds and at exit)."""
    with _lock:
        _save_disk_memo()


def forget() -> None:
    """Drop the in-memory memo (tests)."""
    global _disk_loaded_from, _last_save
    with _lock:
        _memory.clear()
        _disk_loaded_from = None
        _last_save = float("-inf")
