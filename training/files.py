"""Files ``zeroshot-ild-train`` writes: atomic writes, and which ``--out`` folders are its own.

Atomic writes live in the engine (``ZeroShotILDLib.atomic_files``) so that every writer shares them.

The rules for ``--out`` are those of ``zeroshot-ild``'s result folders (``ZeroShotILDLib.outputs``):

- A new or empty folder is taken. A non-empty one is taken only when it holds this tool's manifest
  (``.zeroshot-ild-train-manifest.json``) and the files it lists still match the sizes and hashes
  recorded when they were written; anything else is a foreign folder and is refused in one line,
  before any work (a user's ``metrics.csv`` or ``best.safetensors`` is never overwritten).
- Results are built in a staging folder that ``atomic_files.make_staging_dir`` creates with a random
  name *inside* ``--out`` (never beside it, so no folder of the user's can be mistaken for it), and
  moved into place one file at a time with an atomic rename. The staging folder is removed by the
  run that made it; a killed run's is removed by a later run only when it is verifiably ours.
- When the command ends, every file it created or changed in ``--out`` is added to the manifest. A
  run killed half-way leaves the manifest marked as running under its (now dead) process id: the next
  run then accepts the files that run may have changed, since no complete record of them exists.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Iterator

from ZeroShotILDLib.atomic_files import (STAGING_MARK, atomic_path, atomic_write_bytes, atomic_write_text,
                                         make_staging_dir, pid_alive, read_own_json, staging_pid)
from ZeroShotILDLib.errors import InputError

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "claim_out_dir", "staged_output",
           "check_export_target", "TRAIN_MANIFEST"]

TRAIN_MANIFEST = ".zeroshot-ild-train-manifest.json"
MANIFEST_FORMAT = "zeroshot-ild-train-manifest/1"
STAGING_PREFIX = ".zeroshot-ild-train-partial-"
#: Files above this size are recorded by size and a hash of their first and last MiB (a checkpoint of
#: 600 MB would otherwise cost seconds at every start); smaller files by the hash of all their bytes.
WHOLE_HASH_LIMIT = 64 << 20
_END = 1 << 20
_MANIFEST_LIMIT = 16 << 20

#: Folders claimed by this process: resolved path -> snapshot of their files when claimed.
_claimed: dict = {}


def _is_secondary_rank() -> bool:
    """DDP ranks other than 0 run the same command; rank 0 alone owns ``--out``."""
    return any(os.environ.get(k, "0") not in ("", "0") for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def file_record(path) -> dict:
    """Size and hash of a regular file (never through a link)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        digest = hashlib.sha256()
        if st.st_size <= WHOLE_HASH_LIMIT:
            for block in iter(lambda: handle.read(_END), b""):
                digest.update(block)
            return {"size": st.st_size, "sha256": digest.hexdigest()}
        digest.update(handle.read(_END))
        handle.seek(st.st_size - _END)
        digest.update(handle.read(_END))
        return {"size": st.st_size, "ends_sha256": digest.hexdigest()}


def _matches(path: Path, record) -> bool:
    if not isinstance(record, dict):
        return False
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size != record.get("size"):
            return False
        now = file_record(path)
    except OSError:
        return False
    return all(now.get(k) == record.get(k) for k in ("sha256", "ends_sha256"))


def _safe_relative(name) -> bool:
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name:
        return False
    parts = name.split("/")
    return all(p not in ("", ".", "..") for p in parts)


def _files_now(out: Path) -> dict:
    """relative path -> (size, mtime_ns, inode) of every regular file in ``out`` (links not followed)."""
    found = {}
    for root, dirs, files in os.walk(out, followlinks=False):
        base = Path(root)
        dirs[:] = [d for d in dirs if not d.startswith(STAGING_PREFIX)]
        for name in files:
            p = base / name
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                rel = p.relative_to(out).as_posix()
                if rel != TRAIN_MANIFEST:
                    found[rel] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return found


def _read_manifest(out: Path):
    """(doc, None) or (None, why the folder is not ours)."""
    doc, problem = read_own_json(out / TRAIN_MANIFEST, _MANIFEST_LIMIT)
    if problem == "absent":
        return None, "it holds no zeroshot-ild-train manifest"
    if problem == "damaged":
        return None, f"{TRAIN_MANIFEST} is damaged"
    if problem or not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT or not isinstance(doc.get("files"), dict):
        return None, f"{TRAIN_MANIFEST} is not a manifest of zeroshot-ild-train"
    return doc, None


def _verify(out: Path, command: str = ""):
    """(records, None) for a folder of ours, or (None, the reason it is foreign)."""
    doc, why = _read_manifest(out)
    if doc is None:
        return None, why
    running = doc.get("running") if isinstance(doc.get("running"), dict) else None
    pid = running.get("pid") if running else None
    # Shards of one command (``evaluate --shard i/N``) write into the same --out at once; anything
    # else running there would overwrite this run's files.
    if isinstance(pid, int) and pid != os.getpid() and pid_alive(pid) and doc.get("command") != command:
        return None, f"another zeroshot-ild-train command (process {pid}) is writing into it"
    killed = running is not None  # its writer died: the files it changed have no complete record
    records = {}
    for name, record in doc["files"].items():
        if not _safe_relative(name):
            return None, f"{TRAIN_MANIFEST} names {name!r}, which is not a file inside the folder"
        path = out / name
        if _matches(path, record):
            records[name] = record
        elif killed and (path.is_file() and not path.is_symlink()):
            records[name] = None  # possibly rewritten by the killed run: re-recorded when this run ends
        elif not (path.exists() or path.is_symlink()):
            continue  # removed since: nothing to verify, nothing to replace
        else:
            return None, f"{name} does not match what zeroshot-ild-train wrote there (changed or replaced)"
    if not records and not killed:
        return None, f"none of the files {TRAIN_MANIFEST} lists is there"
    return records, None


def _visible(out: Path) -> list:
    return [e for e in out.iterdir() if not (e.name.startswith(STAGING_PREFIX) and staging_pid(e) is not None)]


def _clean_staging(out: Path) -> None:
    """Remove staging folders of killed runs of ours inside ``out`` (verified ours, never a link)."""
    for entry in out.iterdir():
        if not entry.name.startswith(STAGING_PREFIX):
            continue
        pid = staging_pid(entry)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        # Everything in it was made by that run (mode 0700, random name); rmtree never follows links.
        shutil.rmtree(entry, ignore_errors=True)


def _write_manifest(out: Path, records: dict, *, command: str, running: bool) -> None:
    doc = {"format": MANIFEST_FORMAT, "note": "files zeroshot-ild-train wrote here, with their sizes and hashes",
           "command": command, "files": {k: v for k, v in sorted(records.items()) if v is not None}}
    if running:
        doc["running"] = {"pid": os.getpid(), "since": time.time()}
    atomic_write_text(out / TRAIN_MANIFEST, json.dumps(doc, indent=1) + "\n")


def claim_out_dir(out, command: str) -> Path:
    """Check ``--out`` before any work and take it for this run; one line if it is not ours.

    Returns the resolved folder (created when new). Idempotent within a process.
    """
    out = Path(out).expanduser().resolve()
    if out in _claimed or _is_secondary_rank():
        return out
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder: choose another --out")
    records: dict = {}
    if out.is_dir():
        with contextlib.suppress(OSError):
            _clean_staging(out)
        if [e for e in _visible(out) if e.name != TRAIN_MANIFEST]:
            records, why = _verify(out, command)
            if records is None:
                raise InputError(f"--out {out} is not empty and is not a folder zeroshot-ild-train wrote ({why}): "
                                 "choose a new or empty --out (nothing there was changed)")
    new = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        # Marked as ours at once (running): a run killed later can still be resumed into it.
        _write_manifest(out, records, command=command, running=True)
    except OSError as exc:
        raise InputError(f"cannot write to --out {out} ({exc.strerror or exc}): choose another --out") from None
    _claimed[out] = {"before": _files_now(out), "records": records, "command": command, "new": new}
    if len(_claimed) == 1:
        atexit.register(finish_all)
    return out


def finish(out) -> None:
    """Record every file this run created or changed in ``out``; clear the running mark."""
    out = Path(out).expanduser().resolve()
    state = _claimed.pop(out, None)
    if state is None or not out.is_dir():
        return
    records = dict(state["records"])
    before = state["before"]
    for name, ident in _files_now(out).items():
        if before.get(name) != ident or records.get(name, 0) is None:
            with contextlib.suppress(OSError):
                records[name] = file_record(out / name)
    for name in [n for n in records if not (out / n).is_file()]:
        records.pop(name)
    with contextlib.suppress(OSError):
        if state["new"] and not records and [e.name for e in out.iterdir()] == [TRAIN_MANIFEST]:
            # The run made this folder and wrote nothing into it (it failed early): leave no trace.
            (out / TRAIN_MANIFEST).unlink()
            out.rmdir()
            return
        _write_manifest(out, records, command=state["command"], running=False)


def finish_all() -> None:
    for out in list(_claimed):
        finish(out)


@contextlib.contextmanager
def staged_output(out, command: str = "") -> Iterator[Path]:
    """A staging folder inside ``out`` whose files are moved into ``out`` (one atomic rename each) on success.

    Only the file names the command writes are replaced in ``out``; anything else there stays.
    """
    out = claim_out_dir(out, command or "output")
    tmp = make_staging_dir(out, STAGING_PREFIX)
    try:
        yield tmp
        for path in sorted(tmp.rglob("*")):
            if (path.parent == tmp and path.name == STAGING_MARK) or path.is_symlink() or not path.is_file():
                continue
            target = out / path.relative_to(tmp)
            if target.is_symlink() or (target.exists() and not target.is_file()):
                raise InputError(f"{target} is in the way of an output (it is not a plain file): move it "
                                 "and run again")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    finally:
        # Everything left in it was made by this run.
        shutil.rmtree(tmp, ignore_errors=True)


def check_export_target(path) -> Path:
    """``export --out FILE``: a new file, or an engine checkpoint this tool wrote; anything else is refused."""
    path = Path(path).expanduser()
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise InputError(f"--out {path} is not a plain file: choose another --out")
    if path.exists():
        from ZeroShotILDLib import models

        try:
            meta = models.read_checkpoint_metadata(path)
        except Exception:  # noqa: BLE001 - any unreadable file is simply not ours
            meta = None
        if not meta:
            raise InputError(f"--out {path} exists and is not an engine checkpoint zeroshot-ild-train wrote: "
                             "choose a new file name (nothing was changed)")
    return path
