"""Content hashes of files, computed once per version of a file and remembered by its stat.

Caches (patch embeddings, training montages) and weight checks key on what a file contains, not
on its name or modification time: two checkpoints of the same size whose mtime was set alike, or
a scan id pointed at a new file, must never share an entry. Hashing a 600 MB checkpoint on every
run would cost seconds, so a hash is remembered under the file's identity on disk (resolved path,
size, mtime and ctime in nanoseconds, inode, device) in memory and in a small JSON memo in the
user cache folder. ``ctime`` cannot be set from user space (``os.utime`` sets only atime and
mtime), so rewriting a file in place and restoring its mtime still changes the key.

The memo is a file anyone with write access to the cache can edit, so a hit is not trusted on its
stat alone: each entry also holds a hash of the file's first and last MiB (``_probe``), recomputed
on every hit (two reads of 1 MiB); an entry whose probe does not match is dropped with a warning
and the file hashed in full. A memo path that is not a regular file (a FIFO would block the run, a
device would be read forever) is ignored with one warning and the memo is not written.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import stat as stat_mod
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
_memory: dict[str, tuple[tuple, str, Optional[str]]] = {}
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


_warned: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def _memo_file_ok(path: Path) -> bool:
    """Whether the memo may be read or written at ``path``: absent, or a regular file (never a FIFO or device)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if stat_mod.S_ISREG(st.st_mode):
        return True
    _warn_once(str(path), f"ignoring the hash memo {path}: it is not a regular file (a FIFO or device); "
                          "hashes are not remembered between runs")
    return False


def _load_disk_memo() -> None:
    global _disk_loaded_from
    path = memo_path()
    if path is None or _disk_loaded_from == path:
        return
    _disk_loaded_from = path
    if not _memo_file_ok(path):
        return
    try:
        # O_NONBLOCK: a FIFO swapped in after the check must not block the run; fstat re-checks.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as handle:
            if not stat_mod.S_ISREG(os.fstat(handle.fileno()).st_mode):
                return
            data = json.loads(handle.read(64 << 20).decode("utf-8"))
        for name, entry in data.get("files", {}).items():
            stat, digest = entry[0], entry[1]
            probe = entry[2] if len(entry) > 2 else None
            _memory.setdefault(name, (tuple(stat), str(digest), probe))
    except FileNotFoundError:
        pass
    except (OSError, ValueError, TypeError, AttributeError, IndexError, KeyError):
        # A damaged memo only costs re-hashing; it is rewritten on the next hash.
        log.debug("ignoring unreadable hash memo %s", path)


def _save_disk_memo() -> None:
    path = memo_path()
    if path is None or not _memo_file_ok(path):
        return
    items = list(_memory.items())[-_MEMO_LIMIT:]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"format": "zeroshot-ild-file-hashes/2",
                                            "files": {k: [list(s), d, p] for k, (s, d, p) in items}}))
    except OSError:
        log.debug("could not write hash memo %s", path)


def _bind(ends: str, digest: str) -> str:
    return hashlib.sha256(f"{ends}:{digest}".encode("ascii", "replace")).hexdigest()


def _probe(paths) -> str:
    """SHA-256 of the first and last MiB of each file (cheap: at most 2 MiB read per file)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            digest.update(str(size).encode("ascii") + b"\0")
            digest.update(handle.read(_CHUNK))
            if size > 2 * _CHUNK:
                handle.seek(size - _CHUNK)
                digest.update(handle.read(_CHUNK))
            elif size > _CHUNK:
                digest.update(handle.read())
    return digest.hexdigest()


def sha256_file(path: os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, hashed only when this version of the file is new to the memo."""
    name, stat = _identity(Path(path))
    # A file changed while it was read must not be remembered under the stat it had before.
    return _memoised(name, stat, lambda: _hash_bytes(name), still=lambda: _identity(Path(name))[1] == stat,
                     probe=lambda: _probe([name]))


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

    ends = [files[0], files[-1]] if files else []
    return _memoised(name, (listing.hexdigest(),), folder_hash, probe=lambda: _probe(ends))


def _hash_bytes(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _memoised(name: str, stat: tuple, compute, still=None, probe=None) -> str:
    global _last_save
    with _lock:
        _load_disk_memo()
        known = _memory.get(name)
    if known is not None and known[0] == stat:
        # The stat matches; the digest is trusted only if the file's ends, hashed together with the
        # digest, still give the recorded check (an edited digest or a swapped file fails it).
        if probe is None or (known[2] is not None and known[2] == _bind(probe(), known[1])):
            return known[1]
        if known[2] is not None:
            _warn_once(f"probe:{name}", f"hash memo entry for {Path(name).name} does not match the file; hashing it "
                                        "again (the memo may have been edited)")
    value = compute()
    ends = _bind(probe(), value) if probe is not None else None
    with _lock:
        if still is None or still():
            _memory.pop(name, None)
            _memory[name] = (stat, value, ends)
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
        _warned.clear()
        _disk_loaded_from = None
        _last_save = float("-inf")
