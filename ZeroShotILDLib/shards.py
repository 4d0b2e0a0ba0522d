"""A cohort split over cluster jobs: ``zeroshot-ild analyze --shard i/N`` and ``zeroshot-ild merge-shards``.

Each scan belongs to exactly one shard, decided from the list of inputs alone (sorted by absolute
path, every N-th from i), so a SLURM array of N tasks given the same inputs covers the cohort once.
A shard analyses its scans into the usual per-scan folders and writes its part of the cohort
summary (``summary.shard-i-of-N.csv``) with a record of which inputs it covered
(``summary.shard-i-of-N.json``). :func:`merge_shards` checks that all N records are there, of the
same inputs, and writes ``summary.csv`` exactly as one unsharded run over the same inputs would.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

from .errors import InputError

RECORD_FORMAT = "zeroshot-ild-shard/1"
_NAME = re.compile(r"^summary\.shard-(\d+)-of-(\d+)\.json$")


def parse_shard(text: str) -> tuple:
    """``"i/N"`` -> (i, N), one line for anything else."""
    try:
        index, count = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise InputError(f"--shard {text!r} is not of the form i/N (e.g. 0/8)") from None
    if count < 1 or not 0 <= index < count:
        raise InputError(f"--shard {text}: use i/N with 0 <= i < N")
    return index, count


def _key(path: str) -> str:
    return os.path.abspath(os.path.expanduser(str(path)))


def shard_indices(inputs: Sequence[str], index: int, count: int) -> list:
    """Positions (in input order) of the inputs that shard ``index`` of ``count`` analyses."""
    order = sorted(range(len(inputs)), key=lambda k: (_key(inputs[k]), k))
    return sorted(order[index::count])


def shard_summary_path(out: Path, index: int, count: int) -> Path:
    return Path(out).expanduser().resolve() / f"summary.shard-{index}-of-{count}.csv"


def write_shard_record(out: Path, index: int, count: int, inputs: Sequence[str], indices: Sequence[int],
                       rows: Sequence[dict]) -> Path:
    """The record ``merge_shards`` reads: all inputs (in order), this shard's positions and its summary rows."""
    from .atomic_files import atomic_write_text

    path = shard_summary_path(out, index, count).with_suffix(".json")
    payload = {"format": RECORD_FORMAT, "shard": index, "of": count, "inputs": [_key(p) for p in inputs],
               "indices": list(indices), "rows": list(rows)}
    return atomic_write_text(path, json.dumps(payload, default=str))


def merge_shards(out: Path, *, overwrite: bool = False) -> tuple:
    """``summary.csv`` of every shard in ``out``: (path, scans, failed). One line when a shard is missing,
    given twice, or of other inputs."""
    from .outputs import check_summary_path, write_summary

    out = Path(out).expanduser()
    if not out.is_dir():
        raise InputError(f"{out} is not a folder: give the --out of the sharded analyze runs")
    records = {}
    for path in sorted(out.iterdir()):
        match = _NAME.match(path.name)
        if not match:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            index, count = int(data["shard"]), int(data["of"])
            inputs, indices, rows = list(data["inputs"]), [int(i) for i in data["indices"]], list(data["rows"])
        except (OSError, ValueError, KeyError, TypeError):
            raise InputError(f"{path.name} is not a readable shard record: re-run that shard") from None
        if data.get("format") != RECORD_FORMAT or len(indices) != len(rows):
            raise InputError(f"{path.name} is not a complete shard record: re-run that shard")
        records.setdefault(count, {})[index] = (inputs, indices, rows)
    if not records:
        raise InputError(f"{out} holds no shard records (summary.shard-i-of-N.json): run `zeroshot-ild analyze ... "
                         f"--out {out} --shard i/N` first")
    if len(records) > 1:
        raise InputError(f"{out} holds shards of {len(records)} different splits ({', '.join(map(str, sorted(records)))}"
                         "-way): keep one")
    count, shards = next(iter(records.items()))
    missing = [str(i) for i in range(count) if i not in shards]
    if missing:
        raise InputError(f"shard(s) {', '.join(missing)} of {count} missing in {out}: run them, then merge")
    inputs = shards[0][0]
    if any(s[0] != inputs for s in shards.values()):
        raise InputError("the shards were given different scans: run every shard with the same inputs")
    placed: dict = {}
    for index, (_, indices, rows) in shards.items():
        if indices != shard_indices(inputs, index, count):
            raise InputError(f"shard {index}/{count} covered other scans than its share: re-run it")
        placed.update(zip(indices, rows))
    summary = check_summary_path(out, overwrite=overwrite)
    ordered = [placed[k] for k in range(len(inputs))]
    write_summary(ordered, summary)
    failed = sum(1 for row in ordered if row.get("error"))
    return summary, len(ordered), failed
