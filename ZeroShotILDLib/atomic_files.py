"""Writing files so that a crash, a full disk or a kill never leaves a half-written one under its name.

One helper for every writer in the project (engine outputs, checkpoints, caches, training files):
the bytes go to a temporary file beside the destination (same file system, so the final rename is
atomic) and are renamed into place only once they are complete. The temporary file gets the mode a
plain ``open()`` would give (``0o666`` less the umask): ``mkstemp`` alone creates ``0o600``, which
hides results from colleagues on a shared workstation.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

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


# ----------------------------------------------------------------------------------------------
# Folders this process owns: staging with unpredictable names, removal of what was verified ours
# ----------------------------------------------------------------------------------------------
# Earlier versions staged under predictable names (``.zeroshot-ild-partial-PID``, ``.OUT.old-PID``)
# and cleaned by name pattern: a link planted under such a name was followed, and a user's folder
# that happened to match the pattern lost files. Now a staging folder is made by ``mkdtemp``
# (random name, created with O_EXCL, mode 0700: nothing can be waiting under its name), carries a
# marker naming the writer's process, and a later run removes from it only regular files with the
# tool's names, looked up through the folder's descriptor so that nothing is followed.
STAGING_MARK = ".zeroshot-ild-staging.json"
STAGING_FORMAT = "zeroshot-ild-staging/1"
_MARK_LIMIT = 4096
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (another user's counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


def make_staging_dir(parent, prefix: str) -> Path:
    """A new staging folder inside ``parent``: random name, mode 0700, marked as this process's."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    try:
        fd = os.open(path / STAGING_MARK, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps({"format": STAGING_FORMAT, "pid": os.getpid(), "created": time.time()}))
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(path)
        raise
    return path


def _open_dir_nofollow(path) -> int:
    return os.open(path, os.O_RDONLY | _DIRECTORY | _NOFOLLOW)


def staging_pid(path) -> Optional[int]:
    """The process id recorded in one of our staging folders, or None when ``path`` is not one.

    Not ours: a link (never followed), anything but a folder, a folder of another user, or one
    without a well-formed marker file.
    """
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
            return None
        dfd = _open_dir_nofollow(path)
    except OSError:
        return None
    try:
        mst = os.stat(STAGING_MARK, dir_fd=dfd, follow_symlinks=False)
        if not stat.S_ISREG(mst.st_mode) or mst.st_size > _MARK_LIMIT:
            return None
        fd = os.open(STAGING_MARK, os.O_RDONLY | _NOFOLLOW, dir_fd=dfd)
        with os.fdopen(fd, "rb") as handle:
            doc = json.loads(handle.read(_MARK_LIMIT).decode("utf-8"))
        pid = doc.get("pid") if isinstance(doc, dict) and doc.get("format") == STAGING_FORMAT else None
        return pid if isinstance(pid, int) and not isinstance(pid, bool) else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    finally:
        os.close(dfd)


def remove_owned_files(folder, names, *, rmdir: bool = True) -> bool:
    """Remove the regular files called ``names`` (and temporary files of :func:`atomic_path` for them)
    from ``folder``; then remove the folder if that left it empty. Returns whether it is gone.

    Looked up through the folder's descriptor without following links: a link or a folder under
    one of those names, or any other entry, is left where it is (and keeps the folder).
    """
    names = set(names) | {STAGING_MARK}
    try:
        dfd = _open_dir_nofollow(folder)
    except OSError:
        return False
    try:
        for entry in os.listdir(dfd):
            ours = entry in names or (entry.endswith(PARTIAL_SUFFIX)
                                      and any(entry.startswith(f".{n}.") for n in names))
            if not ours:
                continue
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.stat(entry, dir_fd=dfd, follow_symlinks=False).st_mode):
                    os.unlink(entry, dir_fd=dfd)
    finally:
        os.close(dfd)
    if not rmdir:
        return False
    try:
        os.rmdir(folder)
        return True
    except OSError:
        return False


def file_record(path) -> dict:
    """``{"size", "sha256"}`` of a regular file, read without following a link (OSError otherwise)."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        digest = hashlib.sha256()
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"size": st.st_size, "sha256": digest.hexdigest()}


def matches_record(path, records) -> bool:
    """Whether the regular file at ``path`` (never a link) has one of the recorded sizes and hashes."""
    records = [r for r in (records if isinstance(records, list) else [records]) if isinstance(r, dict)]
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or not any(r.get("size") == st.st_size for r in records):
        return False
    try:
        now = file_record(path)
    except OSError:
        return False
    return any(r.get("size") == now["size"] and r.get("sha256") == now["sha256"] for r in records)


def check_cache_folder(path, *, option: str = "--cache-dir") -> Path:
    """A cache folder that can be used, created if missing; one line (InputError) when it cannot.

    Called before any work: a cache that is a file or read-only used to fail only when the first
    entry was written, after the whole analysis, with a traceback and no result.
    """
    from .errors import InputError

    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {path} is a file, not a folder: give a folder for the cache (or leave {option} out)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".zeroshot-ild-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"{option} {path} cannot be written ({exc.strerror or exc}): give a folder you can write "
                         f"to (or leave {option} out)") from None
    return path


def special_file(path) -> bool:
    """Whether something that is neither a regular file nor a folder (FIFO, device, socket) is at ``path``."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def read_own_json(path, limit_bytes: int) -> tuple:
    """(document, None), or (None, why): "absent", "foreign" (not a regular file, a link, or over
    ``limit_bytes``) or "damaged" (unreadable or not JSON). For the manifests the tool writes into
    an output folder, which decide what it may replace there: each caller words its own messages."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, "absent"
    if not stat.S_ISREG(st.st_mode) or st.st_size > limit_bytes:
        return None, "foreign"
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")), None
    except (OSError, ValueError):
        return None, "damaged"
