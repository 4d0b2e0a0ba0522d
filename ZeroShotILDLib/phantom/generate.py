"""``generate_phantom`` and ``add_full_width_table``: one chest, or a table for a real one."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..errors import InputError
from .anatomy import _sample_anatomy
from .builder import _Builder
from .checks import _check_geometry, _check_seed, _is_number
from .constants import _STREAM_ANATOMY, STYLE_PATTERNS, SUBTYPES, TABLE_CORE_HU, TABLE_CORE_MM, TABLE_SHELL_MM
from .fields import _Grid
from .volume import Phantom

def generate_phantom(
    seed: int = 0,
    *,
    shape_zyx=(80, 160, 160),
    spacing_mm=(2.0, 2.0, 2.5),
    ild: Optional[bool] = None,
    subtype: Optional[str] = None,
    noise_hu: float = 20.0,
    padding_value: Optional[int] = None,
    table: str = "curved",
    table_gap_mm: Optional[float] = None,
    position: str = "supine",
    lung_hu: Optional[float] = None,
    involvement: Optional[float] = None,
    with_patterns: Sequence[str] = (),
) -> Phantom:
    """Generate one synthetic chest HRCT phantom.

    Parameters
    ----------
    seed : int, default 0
        Non-negative seed; the same seed and arguments give an identical phantom.
    shape_zyx : 3 ints, default (80, 160, 160)
        Array shape ``(z, y, x)``.
    spacing_mm : 3 floats, default (2.0, 2.0, 2.5)
        Voxel spacing ``(x, y, z)`` in mm.
    ild : bool or None, default None
        Whether the lungs carry interstitial lung disease; None draws it from the seed (p = 0.5).
    subtype : str or None, default None
        One of ``SUBTYPES``; implies ``ild=True``. None with ILD draws one from the seed.
    noise_hu : float, default 20.0
        Standard deviation (HU) of the (slightly correlated) image noise.
    padding_value : int or None, default None
        If set, voxels outside the circular field of view (the circle inscribed in the axial
        plane) get this value, as scanners do (e.g. -2048 or -3024); None keeps air there.
    table : {"curved", "full", "none"}, default "curved"
        "curved": a thin curved plate narrower than the body; "full": a flat table as wide as the
        field of view (the array's whole width): two 3 mm carbon shells around a 30 mm foam core
        at ``TABLE_CORE_HU`` (lung-like density), as scanner tables are built; "none": no table.
    table_gap_mm : float or None
        Air between the skin and the table (0 = the table touches the body); None draws 6-16 mm.
    position : {"supine", "prone"}, default "supine"
        Prone puts the table against the anterior chest and makes the anterior lung the
        dependent (denser) one.
    lung_hu : float or None
        Mean HU of the lung parenchyma; None draws -870..-835 (inspiration). About -650 gives an
        expiratory scan.
    involvement : float or None, default None
        Fraction (0-1) of the lung volume inside ``disease_mask``; ``labels["disease_fraction"]``
        lands within a few percentage points of it. The disease starts where its style puts it
        (UIP-like: basal and subpleural; NSIP-like: basal, sparing the immediate subpleural lung;
        HP-like: upper and mid zones, patchy, with dark lobules outside) and spreads from there;
        1.0 fills the whole lung. Honeycombing, reticulation and traction bronchiectasis keep
        their density per involved lung at any extent. A value > 0 implies ILD; 0 gives normal
        lungs (``ild`` False, no subtype) whatever ``ild`` and ``subtype`` say. None keeps the
        style's own draw (12-30 %), so every seed gives the phantom it always gave.
    with_patterns : sequence of str, default ()
        Patterns drawn whatever the style's own draw says, each one the style can draw
        (``STYLE_PATTERNS``; e.g. ground glass under UIP-like fibrosis, which the style draws in
        one lung in seven). For training sets that need more of a rare combination; the random
        streams are not changed, so the same seed gives the same chest and diseased zone (but for
        mosaic attenuation, whose dark lobules take their share of the lung outside the zone).
        Ignored for normal lungs.

    Returns
    -------
    Phantom
    """
    shape, spacing = _check_geometry(shape_zyx, spacing_mm)
    seed = _check_seed(seed, "Phantom seed")
    if not (_is_number(noise_hu) and np.isfinite(noise_hu) and noise_hu >= 0):
        raise InputError(f"noise_hu must be a finite number >= 0, got {noise_hu!r}.")
    if padding_value is not None:
        if not (_is_number(padding_value) and np.isfinite(padding_value)
                and -32768 <= int(padding_value) <= 32767):
            raise InputError(f"padding_value must be an integer that fits in int16 (e.g. -2048), "
                             f"got {padding_value!r}.")
        padding_value = int(padding_value)
    # bool("no") is True: accept only real booleans so a string never silently means "ILD".
    if ild is not None and not isinstance(ild, (bool, np.bool_)):
        raise InputError(f"ild must be True, False or None, got {ild!r}.")
    if involvement is not None:
        if not (_is_number(involvement) and 0.0 <= float(involvement) <= 1.0):
            raise InputError(f"involvement must be a number from 0 to 1 (a fraction of the lung) or None, "
                             f"got {involvement!r}.")
        involvement = float(involvement)
        if involvement > 0 and ild is False:
            raise InputError("involvement > 0 was given with ild=False: drop one of them.")

    meta = np.random.default_rng(seed)
    draw_ild, draw_subtype = meta.random(), meta.integers(len(SUBTYPES))
    if subtype is not None:
        canonical = {s.lower(): s for s in SUBTYPES}.get(str(subtype).strip().lower())
        if canonical is None:
            raise InputError(f"Unknown ILD subtype {subtype!r}: use one of {', '.join(SUBTYPES)}.")
        if ild is False:
            raise InputError("A subtype was given with ild=False: drop the subtype or set ild=True.")
        subtype, ild = canonical, True
    if ild is None:
        ild = bool(draw_ild < 0.5) if involvement is None else involvement > 0
    if involvement == 0.0:
        ild = False   # nothing drawn: the lungs are normal, whatever style was named
    ild = bool(ild)
    if ild and subtype is None:
        subtype = SUBTYPES[int(draw_subtype)]
    if not ild:
        subtype = None
    if isinstance(with_patterns, str):
        with_patterns = (with_patterns,)
    if not (isinstance(with_patterns, (tuple, list)) and all(isinstance(p, str) for p in with_patterns)):
        raise InputError(f"with_patterns must be a list of pattern names, got {with_patterns!r}.")
    with_patterns = tuple(dict.fromkeys(with_patterns))
    if with_patterns and ild:
        unknown = [p for p in with_patterns if p not in STYLE_PATTERNS[subtype]]
        if unknown:
            raise InputError(f"with_patterns {unknown} are not drawn by the {subtype} style: use some of "
                             f"{', '.join(STYLE_PATTERNS[subtype])}.")

    if table not in ("curved", "full", "none"):
        raise InputError(f"table must be 'curved', 'full' or 'none', got {table!r}.")
    if position not in ("supine", "prone"):
        raise InputError(f"position must be 'supine' or 'prone', got {position!r}.")
    for name, value, lo, hi in (("table_gap_mm", table_gap_mm, 0.0, 200.0), ("lung_hu", lung_hu, -1000.0, -400.0)):
        if value is not None and not (_is_number(value) and lo <= value <= hi):
            raise InputError(f"{name} must be a number from {lo:g} to {hi:g} (or None), got {value!r}.")

    geom = _Grid(shape, spacing)
    anat = _sample_anatomy(np.random.default_rng([seed, _STREAM_ANATOMY]), geom)
    # Overrides after every draw, so the random streams (and the default phantom) do not change.
    anat.p["table"], anat.p["prone"] = table, position == "prone"
    if table_gap_mm is not None:
        anat.p["table_gap"] = float(table_gap_mm)
    if lung_hu is not None:
        anat.hu["lung"] = float(lung_hu)
    return _Builder(geom, anat, seed, ild, subtype, float(noise_hu), padding_value, involvement,
                    with_patterns if ild else ()).build()


def add_full_width_table(hu, spacing_mm, body, *, side: str = "below", gap_mm: float = 0.0,
                         noise_hu: float = 20.0, seed: int = 0):
    """A copy of a CT with a full-width table drawn ``gap_mm`` from the body; (hu, table_mask).

    The table is the phantom's ``table="full"`` one (two ``TABLE_SHELL_MM`` shells around a
    ``TABLE_CORE_MM`` foam core at ``TABLE_CORE_HU``), spanning every column of the array, below
    (later rows) or above (earlier rows) the rows that ``body`` (bool [z, y, x]) occupies, with
    ``noise_hu`` of white noise. It replaces whatever those rows held. For tests and figures on
    real CTs whose own table is narrower than the field of view.
    """
    if side not in ("below", "above"):
        raise InputError(f"side must be 'below' or 'above', got {side!r}.")
    hu = np.asarray(hu)
    rows = np.flatnonzero(np.asarray(body).any(axis=(0, 2)))
    if rows.size == 0:
        raise InputError("the body mask is empty: there is nothing to put a table against.")
    sy = float(spacing_mm[1])
    step = 1 if side == "below" else -1
    r = rows[-1] + 1 + int(round(gap_mm / sy)) if step > 0 else rows[0] - 1 - int(round(gap_mm / sy))
    out = hu.copy()
    table = np.zeros(hu.shape, dtype=bool)
    for thick_mm, value in ((TABLE_SHELL_MM, 200), (TABLE_CORE_MM, TABLE_CORE_HU), (TABLE_SHELL_MM, 200)):
        n = max(1, int(round(thick_mm / sy)))
        lo, hi = (r, r + n) if step > 0 else (r - n + 1, r + 1)
        lo, hi = max(lo, 0), min(hi, hu.shape[1])
        if lo < hi:
            out[:, lo:hi, :] = value
            table[:, lo:hi, :] = True
        r += step * n
    if not table.any():
        raise InputError("the table does not fit between the body and the edge of the array.")
    if noise_hu > 0:
        noise = np.random.default_rng(seed).normal(0.0, noise_hu, hu.shape).astype(np.float32)
        out[table] = np.clip(np.rint(out[table] + noise[table]), -1024, 3071).astype(hu.dtype)
    return out, table
