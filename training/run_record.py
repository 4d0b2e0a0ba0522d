"""What produced a run or an evaluation: command line, versions, git commit, settings; and an index.

Every finished ``zeroshot-ild-train`` command that writes an ``--out`` folder leaves in it

- ``run.json``: the command line, the UTC time, Python and package versions, the git commit of
  the source tree (with ``dirty`` when it has uncommitted changes; absent outside a git clone);
- ``config.yaml``: the command's resolved settings, keys as ``--print-config`` prints them, so
  ``--config run/config.yaml`` repeats (or, with ``--resume``, continues) the run without
  retyping its flags;

The index of a results root (``read_index``, ``zeroshot-ild-train runs ROOT``) is built by reading the
``run.json`` of every folder under it (time, command, folder, exit code, headline): nothing is ever
written beside ``--out``, a folder the user did not name (issue 25's rule), and moving or deleting a
run folder updates the index by itself. Nothing here reads report text; settings hold paths and
numbers only.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

log = logging.getLogger(__name__)

RECORD_NAME = "run.json"
CONFIG_NAME = "config.yaml"
INDEX_FIELDS = ("finished_utc", "command", "out", "exit_code", "headline", "git_commit")
_PACKAGES = ("zeroshot-ild", "torch", "lightning", "open_clip_torch", "numpy", "scipy", "scikit-learn", "SimpleITK")


def package_versions(names: Sequence[str] = _PACKAGES) -> dict:
    """name -> installed version, for those installed."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit(folder: Optional[Path] = None) -> Optional[dict]:
    """``{"commit", "dirty"}`` of the git clone holding ``folder`` (default: this package), or None."""
    where = Path(folder) if folder is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def run_record(command: str, argv: Sequence[str], *, exit_code: int) -> dict:
    """The record written as ``run.json``."""
    return {"format": "zeroshot-ild-train-run/1", "command": command, "argv": [str(a) for a in argv],
            "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "exit_code": int(exit_code), "versions": package_versions(), "git": git_commit(),
            "executable": sys.executable}


def write_run_record(out: Path, command: str, argv: Sequence[str], settings: Mapping, *, exit_code: int,
                     headline: str = "") -> dict:
    """Write ``run.json`` and ``config.yaml`` into ``out`` (a resumed run keeps its earlier records under
    ``previous``)."""
    import yaml

    from .files import atomic_write_text

    out = Path(out).expanduser()
    record = dict(run_record(command, argv, exit_code=exit_code), headline=headline)
    earlier = _read_record(out / RECORD_NAME)
    if earlier is not None:
        record["previous"] = [*earlier.pop("previous", []), earlier]
    atomic_write_text(out / RECORD_NAME, json.dumps(record, indent=2) + "\n")
    atomic_write_text(out / CONFIG_NAME, yaml.safe_dump(dict(settings), sort_keys=False, allow_unicode=True))
    return record


def _read_record(path: Path) -> Optional[dict]:
    """A ``run.json`` of ours, or None (missing, unreadable, or someone else's file)."""
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > 4 * 1024 * 1024:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == "zeroshot-ild-train-run/1" else None


def read_index(root: Path, depth: int = 2) -> list:
    """One row (``INDEX_FIELDS``) per run or evaluation folder under ``root`` (its ``run.json``, up to
    ``depth`` folders down), oldest first. Read-only."""
    root = Path(root).expanduser()
    rows = []
    for level in range(1, depth + 1):
        for path in sorted(root.glob("/".join(["*"] * level) + "/" + RECORD_NAME)):
            record = _read_record(path)
            if record is None:
                continue
            rows.append({"finished_utc": record.get("finished_utc", ""), "command": record.get("command", ""),
                         "out": path.parent.relative_to(root).as_posix(), "exit_code": str(record.get("exit_code", "")),
                         "headline": record.get("headline", ""),
                         "git_commit": ((record.get("git") or {}).get("commit") or "")})
    return sorted(rows, key=lambda r: (r["finished_utc"], r["out"]))
