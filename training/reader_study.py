"""Paper 000's reader study: numbered montages for readers, their counts, and agreement (ICC).

Readers count the ILD-specific patches in each scan's n x n montage; the study compares the
retrieval methods (random, CLIP, DAPT-CLIP) by the average share of ILD patches and measures
inter-reader agreement with ICC(3,1).

1. ``export_reader_study`` writes each montage with a numbered grid (cells 1..n*n, row-major
   from the top left, the order ``ZeroShotILDLib.montage.build_montage`` tiles patches in) and a
   blank sheet per reader with columns ``image, scan_id, method, reader, count``. With
   ``blind=True`` the images get neutral names (``case_007.png``) in shuffled order, the sheets
   leave scan_id and method empty, and ``key.csv`` (kept away from readers) maps them back.
2. ``read_reader_counts`` reads the filled sheets back, validating every cell.
3. ``reader_study_table`` gives paper 000 Table 6: per group (ILD positive / negative) and
   method, the mean percentage of ILD patches and ICC(3,1) between readers.

ICC definitions follow Shrout & Fleiss (1979), "Intraclass correlations: uses in assessing
rater reliability", Psychol. Bull. 86(2):420-428; model names as in Koo & Li (2016).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from ZeroShotILDLib import csv_files
from ZeroShotILDLib.errors import InputError

SHEET_COLUMNS = ("image", "scan_id", "method", "reader", "count")


# ---------------------------------------------------------------------------------------------
# Intraclass correlation

@dataclass(frozen=True)
class ICCResult:
    """Shrout & Fleiss ICCs of an (n targets x k raters) table and its ANOVA mean squares."""

    icc1_1: float
    icc2_1: float
    icc3_1: float
    icc1_k: float
    icc2_k: float
    icc3_k: float
    #: Between-targets, within-target, between-raters and residual mean squares.
    bms: float
    wms: float
    jms: float
    ems: float
    n_targets: int
    n_raters: int


def icc(ratings) -> ICCResult:
    """All six Shrout & Fleiss intraclass correlations.

    Parameters
    ----------
    ratings : (n, k) array
        ``n >= 2`` targets (scans) rated by the same ``k >= 2`` raters (readers); no missing
        values.

    Returns
    -------
    ICCResult
        ``icc3_1`` is ICC(3,1): two-way mixed effects, consistency, single rater,
        ``(BMS - EMS) / (BMS + (k-1) EMS)``. ``icc2_1`` (two-way random, absolute agreement) is
        ``(BMS - EMS) / (BMS + (k-1) EMS + k (JMS - EMS) / n)``; ``icc1_1`` (one-way random)
        is ``(BMS - WMS) / (BMS + (k-1) WMS)``; the ``_k`` forms are for the mean of k raters.
        A coefficient whose denominator is 0 (all ratings equal) is NaN.
    """
    x = np.asarray(ratings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        raise InputError(f"ICC needs at least 2 scans rated by at least 2 readers, "
                         f"got a table of shape {x.shape}")
    if not np.isfinite(x).all():
        raise InputError("ICC needs every scan rated by every reader; the table has gaps")
    n, k = x.shape
    grand = x.mean()
    ss_total = float(((x - grand) ** 2).sum())
    ss_rows = k * float(((x.mean(axis=1) - grand) ** 2).sum())
    ss_cols = n * float(((x.mean(axis=0) - grand) ** 2).sum())
    bms = ss_rows / (n - 1)
    wms = (ss_total - ss_rows) / (n * (k - 1))
    jms = ss_cols / (k - 1)
    ems = (ss_total - ss_rows - ss_cols) / ((n - 1) * (k - 1))

    def ratio(num, den):
        return float(num / den) if den != 0 else float("nan")

    return ICCResult(
        icc1_1=ratio(bms - wms, bms + (k - 1) * wms),
        icc2_1=ratio(bms - ems, bms + (k - 1) * ems + k * (jms - ems) / n),
        icc3_1=ratio(bms - ems, bms + (k - 1) * ems),
        icc1_k=ratio(bms - wms, bms),
        icc2_k=ratio(bms - ems, bms + (jms - ems) / n),
        icc3_k=ratio(bms - ems, bms),
        bms=bms, wms=wms, jms=jms, ems=ems, n_targets=n, n_raters=k,
    )


def icc3_1_ci(ratings, *, confidence: float = 0.95) -> tuple[float, float]:
    """Confidence interval of ICC(3,1) from the F distribution (Shrout & Fleiss 1979, Table 4).

    ``F0 = BMS/EMS``; ``FL = F0 / F(1-a/2; n-1, (n-1)(k-1))``,
    ``FU = F0 * F(1-a/2; (n-1)(k-1), n-1)``; bounds ``(F - 1) / (F + k - 1)``.
    """
    from scipy.stats import f as f_dist  # scipy ships with scikit-learn (the train extra)

    r = icc(ratings)
    n, k = r.n_targets, r.n_raters
    if r.ems == 0:
        return float("nan"), float("nan")
    a = 1.0 - confidence
    f0 = r.bms / r.ems
    df1, df2 = n - 1, (n - 1) * (k - 1)
    fl = f0 / f_dist.ppf(1 - a / 2, df1, df2)
    fu = f0 * f_dist.ppf(1 - a / 2, df2, df1)
    return float((fl - 1) / (fl + k - 1)), float((fu - 1) / (fu + k - 1))


# ---------------------------------------------------------------------------------------------
# Export for readers

def numbered_grid(montage, grid_n: int, *, min_cell_px: int = 64):
    """The montage with grid lines and cell numbers 1..n*n (row-major from the top left).

    Parameters
    ----------
    montage : (H, W) or (H, W, 3) array
        uint8, or float in [0, 1]. Cells are ``H // grid_n`` pixels, as ``build_montage`` tiles.
    grid_n : int
        Patches per side (4 for a 4 x 4 montage).
    min_cell_px : int, default 64
        Small montages are enlarged (nearest neighbour) so every cell is at least this many
        pixels and its number is legible.

    Returns
    -------
    PIL.Image.Image (RGB)
    """
    from PIL import Image, ImageDraw, ImageFont

    a = np.asarray(montage)
    if a.ndim == 3 and a.shape[2] in (3, 4):
        a = a[..., :3]
    elif a.ndim != 2:
        raise InputError(f"a montage must be a 2D grey or RGB image, got shape {a.shape}")
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    n = int(grid_n)
    if n < 1 or a.shape[0] < n or a.shape[1] < n:
        raise InputError(f"cannot draw a {n} x {n} grid on a {a.shape[1]} x {a.shape[0]} image")
    cell = min(a.shape[0], a.shape[1]) // n
    scale = max(1, math.ceil(min_cell_px / cell))
    img = Image.fromarray(a).convert("RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    cell *= scale
    draw = ImageDraw.Draw(img)
    line = max(1, cell // 40)
    for i in range(n + 1):
        p = min(i * cell, n * cell - 1)
        draw.line([(p, 0), (p, n * cell - 1)], fill=(255, 210, 0), width=line)
        draw.line([(0, p), (n * cell - 1, p)], fill=(255, 210, 0), width=line)
    font = ImageFont.load_default(size=max(10, cell // 4))
    for idx in range(n * n):
        r, c = divmod(idx, n)
        x, y = c * cell + line + 2, r * cell + line + 2
        label = str(idx + 1)
        box = draw.textbbox((x, y), label, font=font)
        draw.rectangle([box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2], fill=(0, 0, 0))
        draw.text((x, y), label, fill=(255, 255, 0), font=font)
    return img


def _safe(name: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-._" else "_" for ch in str(name))
    return keep.strip("._") or "x"


def export_reader_study(montages: Mapping[tuple, object], out_dir: Union[str, Path], *,
                        grid_n: int, readers: Sequence[str] = (), blind: bool = False,
                        seed: int = 0, min_cell_px: int = 64) -> dict:
    """Write numbered montage PNGs and blank count sheets for a reader study.

    Parameters
    ----------
    montages : mapping
        ``(scan_id, method) -> montage array`` (see ``numbered_grid``).
    out_dir : path
        Created if needed. Receives ``images/*.png``, one ``counts_<reader>.csv`` per reader
        (or a single ``counts.csv`` with an empty reader column) and ``key.csv``.
    grid_n : int
        Patches per montage side.
    readers : sequence of str
        Reader names or codes.
    blind : bool, default False
        Hide scan and method from readers: neutral image names in a seeded random order, empty
        scan_id/method in the sheets; ``key.csv`` maps images back (do not give it to readers).
    seed : int, default 0
        Order of the blinded cases.

    Returns
    -------
    dict
        ``{"images": [paths], "sheets": [paths], "key": path}``.
    """
    if not montages:
        raise InputError("no montages to export")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    items = list(montages.items())
    if blind:
        order = np.random.default_rng(seed).permutation(len(items))
        items = [items[i] for i in order]
    width = max(3, len(str(len(items))))
    rows, images = [], []
    for i, ((scan_id, method), montage) in enumerate(items):
        name = (f"case_{i + 1:0{width}d}.png" if blind
                else f"{_safe(scan_id)}__{_safe(method)}.png")
        if any(r["image"] == name for r in rows):
            raise InputError(f"two montages map to the image name {name}; make scan ids unique")
        path = out / "images" / name
        numbered_grid(montage, grid_n, min_cell_px=min_cell_px).save(path)
        images.append(path)
        rows.append({"image": name, "scan_id": str(scan_id), "method": str(method)})
    key = out / "key.csv"
    with key.open("w", newline="", encoding="utf-8") as f:
        w = csv_files.DictWriter(f, fieldnames=["image", "scan_id", "method", "grid_n"])
        w.writeheader()
        w.writerows({**r, "grid_n": grid_n} for r in rows)
    sheets = []
    for reader in (list(readers) or [""]):
        sheet = out / (f"counts_{_safe(reader)}.csv" if reader else "counts.csv")
        with sheet.open("w", newline="", encoding="utf-8") as f:
            w = csv_files.DictWriter(f, fieldnames=list(SHEET_COLUMNS))
            w.writeheader()
            for r in rows:
                w.writerow({"image": r["image"],
                            "scan_id": "" if blind else r["scan_id"],
                            "method": "" if blind else r["method"],
                            "reader": reader, "count": ""})
        sheets.append(sheet)
    return {"images": images, "sheets": sheets, "key": key}


# ---------------------------------------------------------------------------------------------
# Import

@dataclass(frozen=True)
class ReaderCount:
    scan_id: str
    method: str
    reader: str
    #: Patches the reader marked as ILD-specific.
    count: int


def read_reader_counts(paths: Iterable[Union[str, Path]], *, grid_n: int,
                       key_path: Optional[Union[str, Path]] = None,
                       allow_blank: bool = False) -> list[ReaderCount]:
    """Read filled sheets back.

    Parameters
    ----------
    paths : iterable of path
        CSV sheets with columns ``scan_id, method, reader, count`` (``image`` optional; with
        ``key_path`` it fills in blinded scan_id/method).
    grid_n : int
        Patches per side; counts must be whole numbers in ``0..grid_n**2``.
    key_path : path, optional
        ``key.csv`` of a blinded export.
    allow_blank : bool, default False
        Skip rows whose count is empty instead of failing.

    Raises
    ------
    InputError
        One line naming the file, line and column of the first problem, or a duplicated
        (scan, method, reader).
    """
    key = {}
    if key_path is not None:
        with Path(key_path).open(newline="", encoding="utf-8-sig") as f:
            key = {r["image"]: (r["scan_id"], r["method"]) for r in csv_files.DictReader(f)}
    max_count = int(grid_n) ** 2
    out: list[ReaderCount] = []
    seen: dict = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"reader sheet {path} does not exist")
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv_files.DictReader(f)
            cols = [c.strip().lower() for c in (reader.fieldnames or [])]
            for need in ("reader", "count"):
                if need not in cols:
                    raise InputError(f"reader sheet {path.name} has no {need} column")
            for raw in reader:
                row = {str(k).strip().lower(): (v or "").strip() for k, v in raw.items() if k}
                where = f"{path.name} line {reader.line_num}"
                scan_id, method = row.get("scan_id", ""), row.get("method", "")
                if (not scan_id or not method) and row.get("image") in key:
                    scan_id, method = key[row["image"]]
                if not scan_id or not method:
                    raise InputError(f"{where}: scan_id/method empty and no key.csv entry for "
                                     f"image {row.get('image', '')!r}; pass the study's key.csv")
                if not row.get("reader"):
                    raise InputError(f"{where}, column reader: empty; write the reader's name")
                text = row.get("count", "")
                if not text:
                    if allow_blank:
                        continue
                    raise InputError(f"{where}, column count: not filled in")
                try:
                    value = float(text)
                except ValueError:
                    raise InputError(f"{where}, column count: {text[:20]!r} is not a number") from None
                if value != int(value) or not 0 <= value <= max_count:
                    raise InputError(f"{where}, column count: {text!r} must be a whole number "
                                     f"from 0 to {max_count}")
                rc = ReaderCount(scan_id, method, row["reader"], int(value))
                k = (rc.scan_id, rc.method, rc.reader)
                if k in seen:
                    raise InputError(f"{where}: {rc.reader} already counted {rc.scan_id} / "
                                     f"{rc.method} at {seen[k]}")
                seen[k] = where
                out.append(rc)
    if not out:
        raise InputError("the reader sheets hold no counts")
    return out


# ---------------------------------------------------------------------------------------------
# Analysis

def count_table(counts: Sequence[ReaderCount], method: str,
                scan_ids: Optional[Iterable[str]] = None):
    """Scans x readers table of counts for one method.

    Returns
    -------
    (table, scan_ids, readers, dropped)
        ``table`` is (n_scans, n_readers) float; scans not counted by every reader are left
        out and listed in ``dropped`` (ICC needs complete rows).
    """
    rows = [c for c in counts if c.method == method]
    wanted = None if scan_ids is None else set(scan_ids)
    readers = sorted({c.reader for c in rows})
    by_scan: dict = {}
    for c in rows:
        if wanted is None or c.scan_id in wanted:
            by_scan.setdefault(c.scan_id, {})[c.reader] = c.count
    complete = sorted(s for s, d in by_scan.items() if len(d) == len(readers))
    dropped = sorted(set(by_scan) - set(complete))
    table = np.array([[by_scan[s][r] for r in readers] for s in complete], dtype=np.float64)
    return table.reshape(len(complete), len(readers)), complete, readers, dropped


def reader_study_table(counts: Sequence[ReaderCount], *, grid_n: int,
                       groups: Optional[Mapping[str, str]] = None,
                       methods: Optional[Sequence[str]] = None) -> list[dict]:
    """Paper 000 Table 6: share of ILD patches and inter-reader ICC(3,1) per group and method.

    Parameters
    ----------
    counts : sequence of ReaderCount
    grid_n : int
        Patches per side (the share is ``count / grid_n**2``).
    groups : mapping, optional
        ``scan_id -> group`` (e.g. ``"Positive"`` / ``"Negative"`` from the ILD labels); one
        group ``"all"`` by default. Scans missing from the mapping are left out.
    methods : sequence of str, optional
        Row order; default sorted method names.

    Returns
    -------
    list of dict
        Keys ``group, method, n_scans, n_readers, mean_count, percent_ild, icc3_1,
        icc3_1_low, icc3_1_high, dropped_scans``. The mean counts every reader's count of every
        scan; ICC uses scans counted by all readers (NaN with fewer than 2 of either).
    """
    cells = int(grid_n) ** 2
    methods = list(methods) if methods is not None else sorted({c.method for c in counts})
    if groups is None:
        group_of = {c.scan_id: "all" for c in counts}
    else:
        group_of = {str(k): str(v) for k, v in groups.items()}
    group_names = list(dict.fromkeys(group_of.values()))
    out = []
    for g in group_names:
        scans = {s for s, gg in group_of.items() if gg == g}
        for m in methods:
            sel = [c.count for c in counts if c.method == m and c.scan_id in scans]
            if not sel:
                continue
            table, complete, readers, dropped = count_table(counts, m, scans)
            value = low = high = float("nan")
            if table.shape[0] >= 2 and table.shape[1] >= 2:
                value = icc(table).icc3_1
                if table.shape[0] >= 3:
                    low, high = icc3_1_ci(table)
            mean = float(np.mean(sel))
            out.append({
                "group": g, "method": m, "n_scans": len({c.scan_id for c in counts
                                                          if c.method == m and c.scan_id in scans}),
                "n_readers": len(readers), "mean_count": mean,
                "percent_ild": 100.0 * mean / cells, "icc3_1": value,
                "icc3_1_low": low, "icc3_1_high": high, "dropped_scans": len(dropped),
            })
    return out


def patch_overlap_percent(patch_in_disease: Sequence[Sequence[bool]]) -> float:
    """Mean percentage of montage patches that overlap the disease (automated reader study).

    ``patch_in_disease[i][j]`` says whether patch j of scan i touches the ground-truth disease
    mask (phantoms); the result is comparable to Table 6's "% of patch montage with ILD".
    """
    per_scan = [100.0 * float(np.mean(np.asarray(p, dtype=bool))) for p in patch_in_disease
                if len(p)]
    if not per_scan:
        raise InputError("no patches to score")
    return float(np.mean(per_scan))
