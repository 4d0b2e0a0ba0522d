"""Synthetic chest HRCT phantoms in Hounsfield units.

The fixture for tests, the demo, benchmarks and DAPT training: a seeded generator of chest CT
volumes that a lung segmentation and a CLIP model take for chest CT, with ground truth (lungs,
airways, disease) and a synthetic radiology report consistent with what was drawn.

Anatomy is laid out in millimetres, so any shape and spacing gives the same chest (scaled down only
when the field of view is too small to hold it). Coordinates follow SimpleITK with an identity
direction: arrays are ``[z, y, x]``, LPS ``+x`` is the patient's left, ``+y`` posterior and ``+z``
superior (slice 0 is the most caudal).

The volume is built in passes, each cheap in memory (float32 volume, per-slice 2-D work):

1. per slice: body, subcutaneous fat, muscle, table, spine, sternum, scapulae, mediastinum and
   heart, liver below the diaphragm domes, and the two lungs (truth ``lung_mask``);
2. tubes: ribs, clavicles, trachea and main bronchi, bronchial trees, arteries and veins;
3. per slice: diffuse disease (reticulation, ground glass, mosaic attenuation) from smooth
   3-D fields;
4. tubes and spheres: honeycomb cysts, traction bronchiectasis, centrilobular nodules;
5. per slice: scanner blur, correlated noise, circular field of view, int16.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from .atomic_files import atomic_path
from .errors import InputError
from .settings import DEFAULT_SUBTYPES

SUBTYPES = tuple(DEFAULT_SUBTYPES)
#: Pattern names used in ``labels["patterns"]`` (and, verbatim, in the reports).
PATTERNS = (
    "reticulation",
    "honeycombing",
    "ground-glass opacity",
    "traction bronchiectasis",
    "centrilobular nodules",
    "mosaic attenuation",
)
MANIFEST_COLUMNS = ("scan_path", "report_text", "ild", "subtype", "patient_id", "split")

_IPF, _SSC, _HP = SUBTYPES
_AIR_HU = -1000.0
#: Full-width table: carbon shells around a foam core whose density is that of aerated lung.
TABLE_SHELL_MM, TABLE_CORE_MM, TABLE_CORE_HU = 3.0, 30.0, -920.0
_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# Independent random streams per component, so that e.g. the same seed with ild=True and
# ild=False gives the same chest and differs only in the disease.
_STREAM_ANATOMY, _STREAM_DISEASE, _STREAM_REPORT, _STREAM_NOISE, _STREAM_BENIGN = 1, 2, 3, 4, 5


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
@dataclass
class Phantom:
    """A synthetic chest CT with its ground truth.

    Attributes
    ----------
    hu : ndarray of int16, shape (z, y, x)
        Hounsfield units.
    spacing_mm : tuple of 3 floats
        Voxel spacing ``(x, y, z)`` in mm, as SimpleITK reports it.
    origin_mm : tuple of 3 floats
        LPS position ``(x, y, z)`` in mm of voxel ``[0, 0, 0]``; the volume is centred on 0.
    direction : tuple of 9 floats
        Identity direction cosines.
    lung_mask : ndarray of bool, shape (z, y, x)
        Both lungs: parenchyma with the vessels, small airways and disease inside them; not the
        trachea, main bronchi, mediastinum or chest wall.
    disease_mask : ndarray of bool, shape (z, y, x)
        Union of all ILD pattern regions; a subset of ``lung_mask``; empty for normal phantoms.
    airway_mask : ndarray of bool, shape (z, y, x)
        Lumen of the trachea and the two main bronchi.
    body_mask : ndarray of bool, shape (z, y, x)
        The patient: inside the skin (a read-only broadcast view; the body does not change along z).
    labels : dict
        ``{"ild": bool, "subtype": str or None, "patterns": [str, ...], "seed": int,
        "benign": [str, ...], "disease_fraction": float}``; ``patterns`` are names from
        ``PATTERNS`` actually drawn, ``benign`` lists non-ILD findings (normal phantoms only).
    report : str
        Synthetic radiology report (FINDINGS with four sections, then IMPRESSION).
    """

    hu: np.ndarray
    spacing_mm: tuple
    origin_mm: tuple
    direction: tuple
    lung_mask: np.ndarray
    disease_mask: np.ndarray
    airway_mask: np.ndarray
    labels: dict
    report: str
    body_mask: Optional[np.ndarray] = None

    def to_sitk(self):
        """Return the volume as an int16 ``SimpleITK.Image`` with spacing, origin and direction."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(self.hu, dtype=np.int16))
        image.SetSpacing(tuple(float(v) for v in self.spacing_mm))
        image.SetOrigin(tuple(float(v) for v in self.origin_mm))
        image.SetDirection(tuple(float(v) for v in self.direction))
        return image

    def save(self, path) -> None:
        """Write the volume to ``path``; the extension picks the format (.nii.gz, .nrrd, .mha, ...)."""
        import SimpleITK as sitk

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            sitk.WriteImage(self.to_sitk(), str(path), True)
        except RuntimeError as exc:
            raise InputError(
                f"Cannot write phantom to {path}: use an extension SimpleITK writes "
                f"(.nii.gz, .nrrd, .mha)."
            ) from exc


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
        ild = bool(draw_ild < 0.5)
    ild = bool(ild)
    if ild and subtype is None:
        subtype = SUBTYPES[int(draw_subtype)]
    if not ild:
        subtype = None

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
    return _Builder(geom, anat, seed, ild, subtype, float(noise_hu), padding_value).build()


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


def generate_cohort(n: int, seed: int = 0, positive_fraction: float = 0.5, **kwargs) -> Iterator[Phantom]:
    """Yield ``n`` phantoms: ``round(n * positive_fraction)`` with ILD, in a seeded order.

    Positives cycle through ``SUBTYPES`` (balanced) unless ``subtype`` is given in ``kwargs``.
    Each phantom gets its own seed drawn from ``seed`` (stored in ``labels["seed"]``, so any one
    can be regenerated alone). Other ``kwargs`` go to ``generate_phantom``.
    """
    n = _check_count(n)
    seed = _check_seed(seed, "Cohort seed")
    try:
        fraction_ok = 0.0 <= float(positive_fraction) <= 1.0
    except (TypeError, ValueError):
        fraction_ok = False
    if not fraction_ok:
        raise InputError(f"positive_fraction must be in [0, 1], got {positive_fraction!r}.")
    for key in ("seed", "ild"):
        if key in kwargs:
            raise InputError(f"generate_cohort sets '{key}' itself: do not pass it in kwargs.")
    rng = np.random.default_rng([int(seed), 1000])
    n_pos = int(round(n * float(positive_fraction)))
    is_pos = np.zeros(n, dtype=bool)
    is_pos[:n_pos] = True
    rng.shuffle(is_pos)
    subtypes = [SUBTYPES[i % len(SUBTYPES)] for i in range(n_pos)]
    rng.shuffle(subtypes)
    seeds = rng.choice(2**31 - 1, size=n, replace=False) if n else []
    fixed_subtype = kwargs.pop("subtype", None)

    def phantoms():
        pos_i = 0
        for i in range(n):
            if is_pos[i]:
                sub = fixed_subtype or subtypes[pos_i]
                pos_i += 1
                yield generate_phantom(int(seeds[i]), ild=True, subtype=sub, **kwargs)
            else:
                yield generate_phantom(int(seeds[i]), ild=False, **kwargs)
    return phantoms()


def write_cohort(out_dir, n, seed=0, positive_fraction=0.5, fmt=".nii.gz", **kwargs) -> Path:
    """Write ``n`` phantoms and a ``manifest.csv`` describing them; return the manifest path.

    Scans go to ``out_dir/scans/phantom_XXXX<fmt>``. The manifest has the columns
    ``scan_path`` (relative to the manifest's folder), ``report_text``, ``ild`` (0/1),
    ``subtype`` (empty for normals), ``patient_id`` and ``split`` (left empty for the caller).
    """
    fmt = str(fmt)
    if not fmt.startswith("."):
        fmt = "." + fmt
    if fmt.lower() not in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        raise InputError(f"Unsupported cohort format {fmt!r}: use .nii.gz, .nii, .nrrd or .mha.")
    # Validate the arguments before anything is created on disk.
    cohort = generate_cohort(n, seed=seed, positive_fraction=positive_fraction, **kwargs)
    out_dir = Path(out_dir)
    (out_dir / "scans").mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "manifest.csv"
    rows = []
    for i, ph in enumerate(cohort):
        rel = Path("scans") / f"phantom_{i:04d}{fmt}"
        ph.save(out_dir / rel)
        rows.append({
            "scan_path": rel.as_posix(),
            "report_text": ph.report,
            "ild": int(ph.labels["ild"]),
            "subtype": ph.labels["subtype"] or "",
            "patient_id": f"SYN{ph.labels['seed']:010d}",
            "split": "",
        })
    # A reader (or a killed run's next attempt) never sees a half-written manifest.
    with atomic_path(manifest) as partial, open(partial, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(MANIFEST_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def _check_geometry(shape_zyx, spacing_mm):
    try:
        shape = tuple(int(v) for v in shape_zyx)
        spacing = tuple(float(v) for v in spacing_mm)
    except (TypeError, ValueError):
        raise InputError("shape_zyx must be 3 integers and spacing_mm 3 numbers.") from None
    if len(shape) != 3 or len(spacing) != 3:
        raise InputError("shape_zyx must be 3 integers (z, y, x) and spacing_mm 3 numbers (x, y, z).")
    if shape[0] < 4 or shape[1] < 16 or shape[2] < 16:
        raise InputError(f"Phantom shape {shape} is too small: use at least (4, 16, 16).")
    if not all(np.isfinite(s) and 0.05 <= s <= 20.0 for s in spacing):
        raise InputError(f"Phantom spacing_mm {spacing} must be between 0.05 and 20 mm.")
    return shape, spacing


def _is_number(value) -> bool:
    """A real number (not a bool, a string or None), so the range checks below cannot raise."""
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def _check_seed(seed, what):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"{what} must be a non-negative integer, got {seed!r}.")
    return int(seed)


def _check_count(n):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise InputError(f"Cohort size must be a non-negative integer, got {n!r}.")
    return int(n)


# --------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------
class _Grid:
    """Image grid: shape (z, y, x), spacing (x, y, z) mm, origin centred on 0."""

    def __init__(self, shape, spacing):
        self.shape = shape
        self.spacing = spacing
        nz, ny, nx = shape
        sx, sy, sz = spacing
        self.origin = (-(nx - 1) * sx / 2.0, -(ny - 1) * sy / 2.0, -(nz - 1) * sz / 2.0)
        self.xs = (self.origin[0] + np.arange(nx) * sx).astype(np.float32)
        self.ys = (self.origin[1] + np.arange(ny) * sy).astype(np.float32)
        self.zs = self.origin[2] + np.arange(nz) * sz
        self.fov_radius = min(nx * sx, ny * sy) / 2.0
        self.voxel_mm = float(np.cbrt(sx * sy * sz))


def _normalize(v):
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-9)


def _rotate(v, axis, angle):
    """Rotate unit vectors ``v`` (N,3) about unit axes ``axis`` (N,3) perpendicular to them."""
    c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
    return v * c + np.cross(axis, v) * s


def _random_perpendicular(rng, d):
    a = _normalize(np.cross(d, _normalize(rng.normal(size=d.shape))))
    return a


def _ellipse_q(x, y, cx, cy, a, b_ant, b_post):
    """Squared normalised radius of an ellipse whose anterior (-y) and posterior halves differ."""
    dy = y - cy
    b = np.where(dy < 0, b_ant, b_post)
    return ((x - cx) / a) ** 2 + (dy / b) ** 2


def _capsule_d2(x, y, p, q):
    """Squared in-plane distance to the segment p-q (broadcast x (1,nx), y (ny,1))."""
    dx, dy = q[0] - p[0], q[1] - p[1]
    l2 = max(dx * dx + dy * dy, 1e-9)
    t = np.clip(((x - p[0]) * dx + (y - p[1]) * dy) / l2, 0.0, 1.0)
    return (x - p[0] - t * dx) ** 2 + (y - p[1] - t * dy) ** 2


def _smoothstep(x, lo, hi):
    t = np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class _Field:
    """A scalar field sampled on a regular 3-D lattice (mm), read by trilinear interpolation."""

    def __init__(self, data, origin_zyx, step_mm):
        self.data = np.ascontiguousarray(data, dtype=np.float32)
        self.origin = np.asarray(origin_zyx, dtype=np.float64)
        self.step = float(step_mm)
        self._prep = None

    def at(self, pts_xyz):
        """Values at points ``(N, 3)`` given as (x, y, z) mm; nearest edge value outside."""
        pts = np.asarray(pts_xyz, dtype=np.float64)
        coords = np.stack([(pts[:, 2] - self.origin[0]) / self.step,
                           (pts[:, 1] - self.origin[1]) / self.step,
                           (pts[:, 0] - self.origin[2]) / self.step])
        return ndimage.map_coordinates(self.data, coords, order=1, mode="nearest")

    def prepare(self, ys, xs):
        """Cache bilinear weights for the in-plane pixel centres ``ys``, ``xs`` (mm)."""
        def axis(vals, o, n):
            f = np.clip((np.asarray(vals, np.float64) - o) / self.step, 0, n - 1)
            i0 = np.minimum(np.floor(f).astype(np.intp), max(n - 2, 0))
            i1 = np.minimum(i0 + 1, n - 1)
            return i0, i1, (f - i0).astype(np.float32)
        self._prep = (axis(ys, self.origin[1], self.data.shape[1]),
                      axis(xs, self.origin[2], self.data.shape[2]))

    def plane(self, z):
        """Values on the prepared pixel grid at height ``z`` (mm), float32 (len(ys), len(xs))."""
        nz = self.data.shape[0]
        f = min(max((z - self.origin[0]) / self.step, 0.0), nz - 1)
        k0 = min(int(math.floor(f)), max(nz - 2, 0))
        k1 = min(k0 + 1, nz - 1)
        fz = np.float32(f - k0)
        p = self.data[k0] * (1 - fz) + self.data[k1] * fz
        (j0, j1, fy), (i0, i1, fx) = self._prep
        rows = p[j0] * (1 - fy)[:, None] + p[j1] * fy[:, None]
        return rows[:, i0] * (1 - fx) + rows[:, i1] * fx


def _smooth_noise(rng, shape, sigma_cells):
    """Zero-mean, unit-variance Gaussian-smoothed white noise (float32)."""
    n = rng.standard_normal(shape, dtype=np.float32)
    n = ndimage.gaussian_filter(n, sigma_cells, mode="wrap", truncate=3.0)
    n -= n.mean()
    n /= max(float(n.std()), 1e-6)
    return n


def _noise_field(rng, lo_zyx, hi_zyx, feature_mm):
    """A smooth random field over the box lo..hi (mm) with blobs about ``feature_mm`` across."""
    step = feature_mm / 2.5
    lo = np.asarray(lo_zyx, float) - 2 * step
    shape = tuple(int(math.ceil((h - l) / step)) + 3 for l, h in zip(lo, hi_zyx))
    return _Field(_smooth_noise(rng, shape, 1.0), lo, step)


# --------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------
@dataclass
class _Anatomy:
    s: float          # in-plane scale (1 = adult size)
    yc: float         # body centre (y, mm)
    body: tuple       # (a, b_ant, b_post) outer skin ellipse
    fat_in: tuple     # inner border of subcutaneous fat
    rib: tuple        # rib centreline ellipse
    cav: tuple        # parietal pleura (thoracic cavity)
    z_base: float     # deepest point of the lungs (posterior costophrenic recess)
    H: float          # lung height, base to apex (mm)
    hu: dict
    p: dict = field(default_factory=dict)   # everything else (positions in mm, levels as h)

    def z_at(self, h):
        return self.z_base + h * self.H


def _sample_anatomy(rng, grid: _Grid) -> _Anatomy:
    """Draw one chest (all random draws in a fixed order, scaled to fit the field of view)."""
    u = rng.uniform
    a0, b_ant0, b_post0 = u(150, 176), u(104, 124), u(98, 118)
    yc0 = u(-6, 6)
    s = min(1.0, 0.9 * grid.fov_radius / max(a0, b_ant0 + abs(yc0), b_post0 + abs(yc0)))
    fat_lat = u(7, 28)
    fat_ant, fat_post = fat_lat * u(0.6, 1.0), fat_lat * u(0.45, 0.8)
    mus_lat, mus_ant, mus_post = u(7, 12), u(9, 17), u(10, 18)
    H0 = u(225, 275)
    z_span = grid.zs[-1] - grid.zs[0] + grid.spacing[2]
    s_z = min(1.0, z_span / (1.14 * H0))
    H = H0 * s_z
    slack = max(z_span - 1.14 * H, 0.0)
    z_base = grid.zs[0] - grid.spacing[2] / 2 + 0.09 * H + u(0.25, 0.75) * slack

    body = (s * a0, s * b_ant0, s * b_post0)
    fat_in = (body[0] - s * fat_lat, body[1] - s * fat_ant, body[2] - s * fat_post)
    rib = (fat_in[0] - s * (mus_lat + 5), fat_in[1] - s * (mus_ant + 5), fat_in[2] - s * (mus_post + 5))
    cav = (rib[0] - s * 7, rib[1] - s * 7, rib[2] - s * 7)
    yc = s * yc0

    hu = {
        "fat": u(-110, -85), "muscle": u(40, 58), "soft": u(30, 45), "blood": u(35, 48),
        "liver": u(50, 65), "spleen": u(40, 52), "cortex": u(750, 1000), "marrow": u(180, 320),
        "disc": u(70, 100), "cartilage": u(110, 190), "lung": u(-870, -835), "lung_grad": u(20, 60),
        "table": u(120, 260), "wall": u(-20, 40),
    }
    p = {}
    p["h_full"] = u(0.6, 0.7)                      # lungs taper above this height
    p["apex_drop_L"] = u(0.0, 0.03)
    p["apex_xy"] = (0.42 * cav[0] * u(0.9, 1.1), yc + cav[2] * u(0.0, 0.2))
    p["h_dome_R"] = u(0.24, 0.32)
    p["h_dome_L"] = p["h_dome_R"] - u(0.02, 0.06)
    p["dome_c"] = (0.45 * cav[0], yc - 0.2 * cav[1])
    p["dome_ax"] = (u(0.58, 0.68) * cav[0], 0.95 * (cav[2] + 0.2 * cav[1]))
    p["dome_scale_L"] = u(0.8, 0.92)   # the left dome (spleen, stomach) is smaller
    r_vb = s * u(15, 18)
    p["vb"] = (0.0, yc + cav[2] - 0.55 * r_vb, r_vb)
    p["canal"] = (0.0, p["vb"][1] + r_vb + s * 7.5, s * 7.0)
    p["v_period"] = H * 0.098
    p["v_phase"] = u(0, 1)
    y_tr = p["vb"][1] - r_vb - s * u(15, 21)
    p["trachea"] = (-s * u(0, 3), y_tr, s * u(7.5, 9.5), s * u(1.6, 2.2))
    p["h_carina"] = u(0.67, 0.73)
    p["h_hilum"] = p["h_carina"] - u(0.07, 0.1)
    # the heart rests on the diaphragm (flat base) and reaches about h = 0.55
    h_bottom, h_top = p["h_dome_L"] - u(0.04, 0.07), u(0.52, 0.58)
    p["heart_c"] = (s * u(25, 40), yc - 0.3 * cav[1], z_base + 0.5 * (h_bottom + h_top) * H)
    p["heart_ax"] = (s * u(55, 68), s * u(42, 52), 0.5 * (h_top - h_bottom) * H)
    p["heart_angle"] = math.radians(u(20, 40))
    r_ao = s * u(12, 16)
    p["r_ao"] = r_ao
    p["aorta_asc"] = (-s * u(8, 16), yc - s * u(5, 15))
    p["aorta_desc"] = (r_vb + 0.75 * r_ao, p["vb"][1] - 0.4 * r_vb)
    p["h_arch"] = u(0.79, 0.84)
    p["pt"] = (s * u(14, 22), yc - s * u(18, 28), s * u(12, 15))
    p["svc"] = (-s * u(26, 34), yc - s * u(2, 12), s * u(8, 11))
    p["eso"] = (s * u(2, 8), y_tr + p["trachea"][2] + s * 9, s * u(5, 7))
    p["band_hw"] = tuple(s * v for v in (u(2, 4), u(5, 8), u(13, 17), u(20, 26), u(18, 23)))
    p["band_hw"] += (r_vb + s * 4,)
    p["hilum_x"] = (-(p["band_hw"][4] + 14 * s), p["band_hw"][4] + 22 * s)
    p["sternum_y"] = yc - rib[1]
    p["table_gap"] = s * u(6, 16)
    # Ribs: posterior head height z0 (as h), drop to the anterior end (mm), anterior extent.
    h_top, h_bot = 1.0 + u(0.0, 0.04), -u(0.0, 0.06)
    p["rib_h0"] = np.linspace(h_top, h_bot, 12) + rng.normal(0, 0.004, 12)
    p["rib_drop"] = np.array([0.12, 0.22, 0.3, 0.35, 0.38, 0.38, 0.37, 0.35, 0.32, 0.28, 0.18, 0.12]) * H
    p["rib_drop"] = p["rib_drop"] * u(0.85, 1.15)
    p["rib_phi_max"] = np.array([2.55, 2.5, 2.5, 2.45, 2.4, 2.35, 2.3, 2.2, 2.05, 1.9, 1.55, 1.25])
    p["rib_r"] = s * u(4.0, 5.0)
    # Tree randomness lives in its own stream so it does not shift the values above.
    p["tree_seed"] = int(rng.integers(2**31 - 1))
    return _Anatomy(s=s, yc=yc, body=body, fat_in=fat_in, rib=rib, cav=cav, z_base=z_base, H=H,
                    hu=hu, p=p)


class _SliceMaps:
    """Per-grid 2-D maps that do not change along z (body layers, organ footprints)."""

    def __init__(self, an: _Anatomy, xs, ys):
        p, hu, s, yc = an.p, an.hu, an.s, an.yc
        x = np.asarray(xs, np.float32)[None, :]
        y = np.asarray(ys, np.float32)[:, None]
        self.x, self.y = x, y
        shape = (y.shape[0], x.shape[1])
        q_body = _ellipse_q(x, y, 0, yc, *an.body)
        skin = (an.body[0] - 1.6, an.body[1] - 1.6, an.body[2] - 1.6)
        static = np.full(shape, _AIR_HU, np.float32)
        static[q_body < 1] = hu["soft"]
        static[_ellipse_q(x, y, 0, yc, *skin) < 1] = hu["fat"]
        static[_ellipse_q(x, y, 0, yc, *an.fat_in) < 1] = hu["muscle"]
        self.body = q_body < 1
        prone = p.get("prone", False)
        kind = p.get("table", "curved")
        if kind == "curved":
            # CT table: a curved plate under the patient
            y_t = yc + an.body[2] + p["table_gap"] - (x ** 2) / (2 * 700.0)
            table = (y >= y_t) & (y <= y_t + 4.0 * max(s, 0.5)) & (np.abs(x) < 0.8 * an.body[0])
            if prone:  # the same plate against the anterior chest
                y_t = yc - an.body[1] - p["table_gap"] + (x ** 2) / (2 * 700.0)
                table = (y <= y_t) & (y >= y_t - 4.0 * max(s, 0.5)) & (np.abs(x) < 0.8 * an.body[0])
            static[table & (q_body >= 1)] = hu["table"]
        elif kind == "full":
            # Depth below the table top, growing away from the patient (posterior supine, anterior prone).
            depth = (y - (yc + an.body[2] + p["table_gap"])) if not prone else ((yc - an.body[1] - p["table_gap"]) - y)
            depth = np.broadcast_to(depth, shape)
            core = (depth >= TABLE_SHELL_MM) & (depth < TABLE_SHELL_MM + TABLE_CORE_MM)
            shells = (depth >= 0) & (depth < 2 * TABLE_SHELL_MM + TABLE_CORE_MM) & ~core
            static[shells & ~self.body] = hu["table"]
            static[core & ~self.body] = TABLE_CORE_HU
        self.cav = _ellipse_q(x, y, 0, yc, *an.cav) < 1
        static[self.cav] = hu["soft"]
        self.static = static

        # Diaphragm height map: a dome per side, lowest in the posterior-lateral recesses.
        cx, cy = p["dome_c"]
        ax, ay = p["dome_ax"]
        zd = []
        for side, h_dome, k in ((-1, p["h_dome_R"], 1.0), (1, p["h_dome_L"], p["dome_scale_L"])):
            q = ((x - side * cx * (2 - k)) / (ax * k)) ** 2 + ((y - cy) / (ay * (0.5 + 0.5 * k))) ** 2
            zd.append(an.z_at(h_dome) - h_dome * an.H * np.minimum(q, 1.0) ** 0.85)
        self.right = np.broadcast_to(x < 0, shape)
        self.zd = np.where(self.right, zd[0], zd[1]).astype(np.float32)
        self.abdomen_hu = np.where(x < s * 25, hu["liver"], hu["spleen"]).astype(np.float32)
        self.abdomen_hu = np.broadcast_to(self.abdomen_hu, shape)

        # Mediastinal band: half-width as a function of the antero-posterior position.
        dy_rel = (y - yc) / np.where(y < yc, an.cav[1], an.cav[2])
        hw = np.interp(dy_rel[:, 0], [-1.05, -0.75, -0.45, -0.1, 0.35, 0.75], p["band_hw"])
        self.band = np.abs(x) < hw[:, None]
        self.band_post = self.band & (dy_rel > 0.45)
        # gravity: dependent (posterior) lung is denser
        dependent = -dy_rel if prone else dy_rel
        self.lung_hu = (hu["lung"] + hu["lung_grad"] * np.clip(dependent, -1, 1) * 0.5).astype(np.float32)
        self.lung_hu = np.broadcast_to(self.lung_hu, shape)

        # Heart (rotated ellipse footprint; its height profile is applied per slice)
        hx, hy, _ = p["heart_c"]
        ha, hb, _ = p["heart_ax"]
        ca, sa = math.cos(p["heart_angle"]), math.sin(p["heart_angle"])
        uu = ca * (x - hx) - sa * (y - hy)
        vv = sa * (x - hx) + ca * (y - hy)
        self.q_heart = (uu / ha) ** 2 + (vv / hb) ** 2
        self.q_heart_fat = (uu / (ha + 5 * s)) ** 2 + (vv / (hb + 5 * s)) ** 2

        def disc(c, r):
            return (x - c[0]) ** 2 + (y - c[1]) ** 2 < r * r
        m = 3.0 * s   # mediastinal fat around great vessels
        r_ao = p["r_ao"]
        self.asc, self.asc_m = disc(p["aorta_asc"], r_ao), disc(p["aorta_asc"], r_ao + m)
        self.desc, self.desc_m = disc(p["aorta_desc"], 0.85 * r_ao), disc(p["aorta_desc"], 0.85 * r_ao + m)
        arch = _capsule_d2(x, y, p["aorta_asc"], p["aorta_desc"])
        self.arch, self.arch_m = arch < (0.9 * r_ao) ** 2, arch < (0.9 * r_ao + m) ** 2
        self.pt, self.pt_m = disc(p["pt"], p["pt"][2]), disc(p["pt"], p["pt"][2] + m)
        hx_r, hx_l = p["hilum_x"]
        pa = np.minimum(_capsule_d2(x, y, p["pt"], (hx_l, p["trachea"][1])),
                        _capsule_d2(x, y, p["pt"], (hx_r, p["trachea"][1])))
        self.pa, self.pa_m = pa < (9 * s) ** 2, pa < (9 * s + m) ** 2
        self.svc, self.svc_m = disc(p["svc"], p["svc"][2]), disc(p["svc"], p["svc"][2] + m)
        self.eso = disc(p["eso"], p["eso"][2])

        # Spine: vertebral body, canal, arch, spinous and transverse processes.
        vx, vy, r_vb = p["vb"]
        d_vb2 = (x - vx) ** 2 + (y - vy) ** 2
        self.vb = d_vb2 < r_vb ** 2
        self.vb_cancellous = d_vb2 < (r_vb - 1.5 * max(s, 0.6)) ** 2
        self.spine_excl = d_vb2 < (r_vb + 2 * s) ** 2
        _, cyy, rc = p["canal"]
        d_c2 = (x - vx) ** 2 + (y - cyy) ** 2
        self.canal = d_c2 < rc ** 2
        self.arch_bone = (d_c2 < (rc + 4.5 * s) ** 2) & ~self.canal
        self.spinous = ((np.abs(x) < 3.5 * s) & (y > cyy + rc) & (y < cyy + rc + 35 * s)
                        & (_ellipse_q(x, y, 0, yc, *an.fat_in) < 1))
        tp = np.minimum(_capsule_d2(x, y, (-6 * s, cyy), (-30 * s, cyy + 6 * s)),
                        _capsule_d2(x, y, (6 * s, cyy), (30 * s, cyy + 6 * s)))
        self.transverse = tp < (4.5 * s) ** 2
        self.spine_excl |= (tp < (6.5 * s) ** 2) & self.cav

        # Sternum and scapulae (z ranges applied per slice)
        self.sternum = ((x / (13 * s)) ** 2 + ((y - p["sternum_y"]) / (6 * s)) ** 2) < 1
        self.manubrium = ((x / (22 * s)) ** 2 + ((y - p["sternum_y"]) / (7 * s)) ** 2) < 1
        q_rib = np.sqrt(_ellipse_q(x, y, 0, yc, *an.rib))
        phi = np.arctan2(np.abs(x) / an.rib[0], (y - yc) / an.rib[2])
        off = 12 * s / an.rib[0]
        self.scapula = ((q_rib > 1 + off) & (q_rib < 1 + off + 5 * s / an.rib[0])
                        & (phi > 0.55) & (phi < 1.3))

        # Lung apices: a paraboloid cap per side
        ax_, ay_ = p["apex_xy"]
        self.q_apex_R = (x + ax_) ** 2 + ((y - ay_) / 0.85) ** 2
        self.q_apex_L = (x - ax_) ** 2 + ((y - ay_) / 0.85) ** 2
        self.apex_r2 = (0.95 * an.cav[0]) ** 2


def _render_slice(an: _Anatomy, m: _SliceMaps, z: float):
    """Paint one axial slice at height ``z`` (mm); returns (hu float32, lung bool, mediastinum bool)."""
    p, hu = an.p, an.hu
    h = (z - an.z_base) / an.H
    img = m.static.copy()
    below = z < m.zd
    abdomen = m.cav & below
    img[abdomen] = m.abdomen_hu[abdomen]

    medi = m.band & ~below
    medi |= m.band_post | m.desc_m
    dzh = (z - p["heart_c"][2]) / p["heart_ax"][2]
    kz = 1.0 - (dzh ** 2 if dzh > 0 else dzh ** 4)
    heart = heart_fat = None
    if kz > 0:
        heart, heart_fat = m.q_heart < kz, m.q_heart_fat < kz
        medi |= heart_fat
    h_heart_top = (p["heart_c"][2] + p["heart_ax"][2] - an.z_base) / an.H
    z_arch = an.z_at(p["h_arch"])
    vessels = [m.eso]
    if h_heart_top - 0.05 < h < p["h_arch"]:
        medi |= m.asc_m
        vessels.append(m.asc)
    if abs(z - z_arch) < p["r_ao"]:
        medi |= m.arch_m
        vessels.append(m.arch)
    if z < z_arch:
        vessels.append(m.desc)
    if p["h_hilum"] - 0.06 < h < p["h_hilum"] + 0.04:
        medi |= m.pt_m
        vessels.append(m.pt)
    if abs(h - p["h_hilum"] - 0.02) < 9 * an.s / an.H:
        medi |= m.pa_m
        vessels.append(m.pa)
    if h > h_heart_top - 0.05:
        medi |= m.svc_m
        vessels.append(m.svc)
    medi &= m.cav

    lung = m.cav & ~medi & ~m.spine_excl & ~below
    if h >= 1.0 or h <= -0.02:
        lung[:] = False
    elif h > p["h_full"]:
        span = 1.0 - p["h_full"]
        r2_R = m.apex_r2 * max(1.0 - h, 0.0) / span
        r2_L = m.apex_r2 * max(1.0 - p["apex_drop_L"] - h, 0.0) / span
        lung &= np.where(m.right, m.q_apex_R < r2_R, m.q_apex_L < r2_L)

    img[medi] = hu["fat"]
    for v in vessels:
        img[v & medi] = hu["blood"]
    if heart is not None:
        img[heart] = hu["blood"]
    img[lung] = m.lung_hu[lung]

    # Spine: discs recur with the vertebral period; the processes sit in part of each level.
    phase = ((z - an.z_base) / p["v_period"] + p["v_phase"]) % 1.0
    if phase < 0.18:
        img[m.vb] = hu["disc"]
    else:
        img[m.vb] = hu["cortex"] * 0.8
        img[m.vb_cancellous] = hu["marrow"]
        img[m.arch_bone] = hu["cortex"] * 0.8
        if phase > 0.3:
            img[m.spinous] = hu["cortex"] * 0.75
        if 0.35 < phase < 0.75:
            img[m.transverse & ~lung] = hu["cortex"] * 0.75
    img[m.canal] = hu["soft"] - 15
    if 0.4 < h < 0.95:
        st = m.manubrium if h > 0.82 else m.sternum
        img[st] = hu["cortex"] * 0.6
    if 0.5 < h < 1.02:
        img[m.scapula] = hu["cortex"] * 0.8
    return img, lung, medi


def _rib_segments(an: _Anatomy):
    """Rib and costal-cartilage centrelines as tube segments (x, y, z) mm: (p0, p1, r, is_bone)."""
    p, s = an.p, an.s
    a, b_ant, b_post = an.rib
    segs = []
    for k in range(12):
        z0 = an.z_at(p["rib_h0"][k])
        n = 28
        phi = np.linspace(0.28, p["rib_phi_max"][k], n)
        if k < 10:   # cartilage joins the sternum (or the costal margin)
            phi = np.concatenate([phi, np.linspace(phi[-1], 2.95 if k < 7 else 2.6, 6)[1:]])
        b = np.where(np.cos(phi) >= 0, b_post, b_ant)
        yy = an.yc + b * np.cos(phi)
        zz = z0 - p["rib_drop"][k] * (phi - 0.28) / (2.5 - 0.28)
        bone = np.arange(len(phi) - 1) < n - 1
        for side in (-1, 1):
            xx = side * a * np.sin(phi)
            pts = np.stack([xx, yy, zz], axis=1)
            head = np.array([[side * (p["vb"][2] + 3 * s), p["vb"][1] + 0.5 * p["vb"][2], z0 + 4 * s]])
            pts = np.concatenate([head, pts])
            bone_k = np.concatenate([[True], bone])
            segs.append((pts[:-1], pts[1:], bone_k))
    p0 = np.concatenate([q[0] for q in segs])
    p1 = np.concatenate([q[1] for q in segs])
    bone = np.concatenate([q[2] for q in segs])
    return p0, p1, bone


# --------------------------------------------------------------------------------------------
# Tubes and spheres
# --------------------------------------------------------------------------------------------
def _tube_chunks(grid: _Grid, p0, p1, r0, r1, edge_mm, max_elems=1_500_000):
    """Rasterise capsules (segments p0-p1 in (x, y, z) mm, radii r0-r1 mm) with a soft edge.

    Yields ``(flat_index, weight)`` chunks, weight in (0, 1] = 1 inside, ramping to 0 over
    ``edge_mm`` around the surface (a crude partial-volume effect). Segments are grouped by box
    size so that thousands of small ones are rasterised in a few vectorised batches.
    """
    p0 = np.atleast_2d(np.asarray(p0, np.float64))
    p1 = np.atleast_2d(np.asarray(p1, np.float64))
    n_seg = len(p0)
    if n_seg == 0:
        return
    r0 = np.broadcast_to(np.asarray(r0, np.float64), (n_seg,))
    r1 = np.broadcast_to(np.asarray(r1, np.float64), (n_seg,))
    edge = np.broadcast_to(np.asarray(edge_mm, np.float64), (n_seg,))
    nz, ny, nx = grid.shape
    sp = np.array(grid.spacing)          # x, y, z
    org = np.array(grid.origin)
    n_axis = np.array([nx, ny, nz])
    ext = np.maximum(r0, r1) + edge
    lo = np.floor((np.minimum(p0, p1) - ext[:, None] - org) / sp).astype(np.int64)
    hi = np.ceil((np.maximum(p0, p1) + ext[:, None] - org) / sp).astype(np.int64)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, n_axis - 1)
    valid = np.all(hi >= lo, axis=1)
    size = hi - lo + 1
    # box sizes rounded up to a ~1.25x ladder: few batches, little padding
    ladder = np.unique(np.ceil(1.25 ** np.arange(40)).astype(np.int64))
    k = np.where(valid[:, None], ladder[np.searchsorted(ladder, np.maximum(size, 1))], 0)
    k = np.minimum(k, n_axis)
    keys = k[:, 0] * 1_000_003 * 1_000_003 + k[:, 1] * 1_000_003 + k[:, 2]
    for key in np.unique(keys[valid]):
        sel = np.nonzero((keys == key) & valid)[0]
        kx, ky, kz = (int(v) for v in k[sel[0]])
        per = kx * ky * kz
        step = max(1, max_elems // per)
        for c in range(0, len(sel), step):
            idx = sel[c:c + step]
            anc = np.minimum(lo[idx], n_axis - np.array([kx, ky, kz]))
            ax = (anc[:, 0, None] + np.arange(kx))
            ay = (anc[:, 1, None] + np.arange(ky))
            az = (anc[:, 2, None] + np.arange(kz))
            xr = (org[0] + ax * sp[0] - p0[idx, 0, None]).astype(np.float32)[:, None, None, :]
            yr = (org[1] + ay * sp[1] - p0[idx, 1, None]).astype(np.float32)[:, None, :, None]
            zr = (org[2] + az * sp[2] - p0[idx, 2, None]).astype(np.float32)[:, :, None, None]
            d = (p1[idx] - p0[idx]).astype(np.float32)
            l2 = np.maximum((d ** 2).sum(1), 1e-9)
            dx, dy, dz = (d[:, i, None, None, None] for i in range(3))
            t = np.clip((xr * dx + yr * dy + zr * dz) / l2[:, None, None, None], 0.0, 1.0)
            dist = np.sqrt((xr - t * dx) ** 2 + (yr - t * dy) ** 2 + (zr - t * dz) ** 2)
            rr = (r0[idx, None, None, None] + t * (r1[idx] - r0[idx])[:, None, None, None])
            w = np.clip((rr - dist) / edge[idx, None, None, None] + 0.5, 0.0, 1.0).astype(np.float32)
            flat = (az[:, :, None, None] * ny + ay[:, None, :, None]) * nx + ax[:, None, None, :]
            keep = w > 0
            if keep.any():
                yield np.broadcast_to(flat, w.shape)[keep], w[keep]


class _Canvas:
    """The float32 volume being painted, its masks, and a scratch buffer for union weights."""

    def __init__(self, grid: _Grid):
        self.grid = grid
        self.hu = np.empty(grid.shape, np.float32)
        self.lung = np.zeros(grid.shape, bool)
        self.disease = np.zeros(grid.shape, bool)
        self.airway = np.zeros(grid.shape, bool)
        self._scratch = None

    def paint(self, chunks, value, *, region=None, amplitude=1.0, only_below=None, above=None):
        """Blend ``value`` into the volume with the union (max) of the chunk weights.

        ``region`` (flat bool) limits where paint lands; ``only_below`` paints only voxels
        currently below that HU (so e.g. ground glass spares vessels), ``above`` only voxels
        above that HU. Returns the flat indices painted and their weights.
        """
        if self._scratch is None:
            self._scratch = np.zeros(self.hu.size, np.float32)
        scratch = self._scratch
        region_flat = None if region is None else region.reshape(-1)
        parts = []
        for idx, w in chunks:
            if region_flat is not None:
                w = w * region_flat[idx]
            np.maximum.at(scratch, idx, w)
            parts.append(idx)
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        # duplicates are fine: every copy reads the same union weight and writes the same value
        idx = np.concatenate(parts)
        w = scratch[idx] * np.float32(amplitude)
        scratch[idx] = 0
        flat = self.hu.reshape(-1)
        v = flat[idx]
        if only_below is not None:
            w = w * (v < only_below)
        if above is not None:
            w = w * (v > above)
        flat[idx] = v + w * (np.float32(value) - v)
        return idx, w


# --------------------------------------------------------------------------------------------
# Trees (bronchi, arteries, veins)
# --------------------------------------------------------------------------------------------
def _partition_tree(rng, points, root, *, r_term, alpha=(0.45, 0.65), wiggle=0.12, split=(0.35, 0.65)):
    """A space-filling vessel tree built by recursively halving a territory of points.

    Every node owns a set of target points (its territory). Its branch runs from the parent's
    end a fraction ``alpha`` of the way to the territory's centroid (the whole way for a single
    point), then the territory is cut across its longest axis into two children. Radii follow
    Murray's law, ``r = r_term * n_points ** (1/3)``. Vectorised per level.

    Returns ``(p0, p1, r0, r1, n_points)`` for all segments (positions (x, y, z) mm).
    """
    pts = np.asarray(points, float)
    n = len(pts)
    if n == 0:
        e3, e1 = np.zeros((0, 3)), np.zeros(0)
        return e3, e3, e1, e1, e1
    node = np.zeros(n, np.intp)
    starts = np.asarray(root, float)[None]
    out = [[], [], [], [], []]
    for _ in range(64):
        m = len(starts)
        cnt = np.bincount(node, minlength=m).astype(float)
        cen = np.stack([np.bincount(node, pts[:, i], minlength=m) for i in range(3)], 1) / cnt[:, None]
        leaf = cnt <= 1
        a = rng.uniform(*alpha, m)
        a[leaf] = 1.0
        vec = cen - starts
        length = np.linalg.norm(vec, axis=1)
        jit = rng.normal(0, wiggle, (m, 3)) * length[:, None]
        jit[leaf] = 0
        ends = starts + a[:, None] * vec + jit * a[:, None]
        r = r_term * cnt ** (1 / 3)
        out[0].append(starts), out[1].append(ends), out[2].append(r)
        out[3].append(r * 0.97), out[4].append(cnt)
        # split each territory with >= 2 points across its longest axis
        alive = ~leaf[node]
        if not alive.any():
            break
        pts_a, node_a = pts[alive], node[alive]
        d = pts_a - cen[node_a]
        cov = np.zeros((m, 3, 3))
        for i in range(3):
            for j in range(i, 3):
                cov[:, i, j] = cov[:, j, i] = np.bincount(node_a, d[:, i] * d[:, j], minlength=m)
        axis = np.linalg.eigh(cov)[1][:, :, -1]
        proj = (d * axis[node_a]).sum(1)
        order = np.lexsort((proj, node_a))
        rank = np.empty(len(order), np.intp)
        first = np.searchsorted(node_a[order], np.arange(m))
        rank[order] = np.arange(len(order)) - first[node_a[order]]
        frac = rng.uniform(*split, m)
        cut = np.clip(np.rint(frac * cnt), 1, np.maximum(cnt - 1, 1))
        child = (rank >= cut[node_a]).astype(np.intp)
        key = node_a * 2 + child
        uniq, new_node = np.unique(key, return_inverse=True)
        pts, node = pts_a, new_node.reshape(-1)
        starts = ends[uniq // 2]
    return tuple(np.concatenate(v) for v in out)


def _territory_points(rng, lung_c, origin_zyx, cs, side, spacing_mm, depth_c=None, min_depth=0.0):
    """Roughly uniform random points (x, y, z mm) in one lung of a coarse mask, ``spacing_mm`` apart."""
    xs = origin_zyx[2] + np.arange(lung_c.shape[2]) * cs
    mask = lung_c & ((xs < 0) if side < 0 else (xs >= 0))[None, None, :]
    if depth_c is not None:
        mask &= depth_c > min_depth
    kz, ky, kx = np.nonzero(mask)
    if len(kz) == 0:
        return np.zeros((0, 3))
    n = int(min(len(kz) * cs ** 3 / spacing_mm ** 3, 8000))
    n = max(n, 2)
    pick = rng.integers(len(kz), size=n)
    jit = rng.uniform(-0.5, 0.5, (n, 3)) * cs
    return np.stack([origin_zyx[2] + kx[pick] * cs, origin_zyx[1] + ky[pick] * cs,
                     origin_zyx[0] + kz[pick] * cs], 1) + jit


# --------------------------------------------------------------------------------------------
# The builder
# --------------------------------------------------------------------------------------------
class _Builder:
    def __init__(self, grid, anat, seed, ild, subtype, noise_hu, padding_value):
        self.grid, self.an, self.seed = grid, anat, seed
        self.ild, self.subtype = ild, subtype
        self.noise_hu, self.padding_value = noise_hu, padding_value
        self.info = {}   # facts for the report

    # -- pass 0: coarse lung model (depth from the pleura for trees and disease) --
    def _coarse(self):
        an = self.an
        cs = float(np.clip(4.0 * an.s, 1.5, 4.0))
        xs = np.arange(-an.cav[0] - 2 * cs, an.cav[0] + 2 * cs + 1e-6, cs)
        ys = np.arange(an.yc - an.cav[1] - 2 * cs, an.yc + an.cav[2] + 2 * cs + 1e-6, cs)
        zs = np.arange(an.z_base - 0.03 * an.H - 2 * cs, an.z_at(1.0) + 2 * cs + 1e-6, cs)
        maps = _SliceMaps(an, xs, ys)
        lung = np.zeros((len(zs), len(ys), len(xs)), bool)
        medi = np.zeros_like(lung)
        for k, z in enumerate(zs):
            _, lung[k], medi[k] = _render_slice(an, maps, z)
        self.c_lung = lung
        self.c_z, self.c_y, self.c_x = zs, ys, xs
        origin = (zs[0], ys[0], xs[0])
        self.cs = cs
        d_all = ndimage.distance_transform_edt(lung, sampling=cs) if lung.any() else np.zeros(lung.shape)
        d_p = ndimage.distance_transform_edt(lung | medi, sampling=cs)
        self.f_depth = _Field(d_all, origin, cs)
        self.f_pleura = _Field(d_p, origin, cs)
        self.c_depth, self.c_pleura = d_all.astype(np.float32), d_p.astype(np.float32)

    def _inside(self, pts, r):
        return self.f_depth.at(pts) > np.asarray(r) + 0.5

    # -- pass 1: per-slice base anatomy --
    def _base(self, cv: _Canvas):
        g, an = self.grid, self.an
        maps = _SliceMaps(an, g.xs, g.ys)
        self.body2d = maps.body
        for k, z in enumerate(g.zs):
            cv.hu[k], cv.lung[k], _ = _render_slice(an, maps, float(z))

    # -- pass 2: tubes --
    def _tubes(self, cv: _Canvas, rng):
        g, an, p, s = self.grid, self.an, self.an.p, self.an.s
        edge = max(g.voxel_mm, 0.4)
        not_lung = ~cv.lung
        # ribs (bone with marrow) and costal cartilage, kept out of the lungs
        p0, p1, bone = _rib_segments(an)
        rr = p["rib_r"]
        cv.paint(_tube_chunks(g, p0[bone], p1[bone], rr, rr, edge), an.hu["cortex"], region=not_lung)
        cv.paint(_tube_chunks(g, p0[bone], p1[bone], rr * 0.6, rr * 0.6, edge), an.hu["marrow"],
                 region=not_lung)
        cv.paint(_tube_chunks(g, p0[~bone], p1[~bone], rr * 0.85, rr * 0.85, edge), an.hu["cartilage"],
                 region=not_lung)
        # clavicles
        z_cl = an.z_at(1.0) + 0.02 * an.H
        c0 = np.array([[-18 * s, p["sternum_y"], z_cl], [18 * s, p["sternum_y"], z_cl]])
        c1 = np.array([[-0.85 * an.rib[0], an.yc - 0.2 * an.rib[1], z_cl + 18 * s],
                       [0.85 * an.rib[0], an.yc - 0.2 * an.rib[1], z_cl + 18 * s]])
        cv.paint(_tube_chunks(g, c0, c1, 6 * s, 5 * s, edge), an.hu["cortex"], region=not_lung)

        # trachea and main bronchi
        tx, ty, tr, tw = p["trachea"]
        z_car = an.z_at(p["h_carina"])
        z_hil = an.z_at(p["h_hilum"])
        carina = np.array([tx, ty, z_car])
        end_r = np.array([p["hilum_x"][0], ty + 6 * s, z_car - 0.55 * (z_car - z_hil) - 6 * s])
        end_l = np.array([p["hilum_x"][1], ty + 10 * s, z_hil - 4 * s])
        top = np.array([tx, ty - 12 * s, g.zs[-1] + 50.0])
        a0 = np.array([top, carina, carina])
        a1 = np.array([carina, end_r, end_l])
        ar = np.array([tr, 0.8 * tr, 0.7 * tr])
        ar1 = np.array([tr, 0.7 * tr, 0.6 * tr])
        idx_w, w_w = cv.paint(_tube_chunks(g, a0, a1, ar + tw, ar1 + tw, edge), an.hu["wall"] + 10)
        idx_l, w_l = cv.paint(_tube_chunks(g, a0, a1, ar, ar1, edge), _AIR_HU)
        cv.lung.reshape(-1)[idx_w[w_w >= 0.5]] = False
        cv.airway.reshape(-1)[idx_l[w_l >= 0.5]] = True

        # Arterial trees fill each lung from the hilum; the larger arteries have a bronchus
        # alongside (bronchovascular bundles); veins fill the same lung from a lower hilum.
        lung = cv.lung
        vessel_hu, wall_hu = an.hu["blood"], an.hu["wall"]
        origin_c = (self.c_z[0], self.c_y[0], self.c_x[0])
        art, veins, bron = [], [], []
        r_term = 0.32 * s
        for side, end, r_main in ((-1, end_r, 0.7 * tr), (1, end_l, 0.6 * tr)):
            spacing = s * rng.uniform(6.5, 8.0)
            pts = _territory_points(rng, self.c_lung, origin_c, self.cs, side, spacing,
                                    self.c_depth, 1.0 * s)
            root = end + np.array([side * 3 * s, -(r_main + 6 * s), -4 * s])
            a0, a1, ar0, ar1, na = _partition_tree(rng, pts, root, r_term=r_term)
            art.append((a0, a1, ar0, ar1))
            big = na >= rng.uniform(25, 40)
            seg = _normalize(a1[big] - a0[big])
            ref = np.where(np.abs(seg[:, 2:3]) > 0.9, [[1.0, 0, 0]], [[0, 0, 1.0]])
            perp = _normalize(np.cross(seg, ref)) * side
            rb = ar0[big] * rng.uniform(0.75, 0.95, int(big.sum()))
            off = perp * (ar0[big] + 1.2 * rb + 0.8 * s)[:, None]
            bron.append((a0[big] + off, a1[big] + off, rb, rb * 0.97))
            # the bronchial tree hangs from the main bronchus: first segment joins it
            first = np.argmax(na)
            bron.append((end[None], (a1[first] + off[0] if big[first] else a1[first])[None],
                         np.array([r_main * 0.8]), np.array([rb[0] if len(rb) else r_main * 0.6])))
            v_root = np.array([side * (p["band_hw"][4] + 6 * s), ty + rng.uniform(-5, 10) * s,
                               z_hil - 0.09 * an.H])
            vpts = _territory_points(rng, self.c_lung, origin_c, self.cs, side, spacing * 1.1,
                                     self.c_depth, 1.0 * s)
            veins.append(_partition_tree(rng, vpts, v_root, r_term=r_term * 1.05)[:4])

        def cat(segs):
            return tuple(np.concatenate([q[i] for q in segs]) for i in range(4))
        min_r = 0.18 * min(g.spacing)   # thinner tubes would not show at this resolution
        for segs, hu in ((cat(veins), vessel_hu - 4), (cat(art), vessel_hu)):
            v0, v1, vr0, vr1 = segs
            keep = vr0 >= min_r
            cv.paint(_tube_chunks(g, v0[keep], v1[keep], vr0[keep], vr1[keep], edge), hu, region=lung)
        b0, b1, br0, br1 = cat(bron)
        wall = 0.2 * br0 + 0.3 * s
        keep = br0 + wall >= min_r
        cv.paint(_tube_chunks(g, b0[keep], b1[keep], (br0 + wall)[keep], (br1 + wall * 0.97)[keep], edge),
                 wall_hu, region=lung)
        cv.paint(_tube_chunks(g, b0[keep], b1[keep], br0[keep], br1[keep], edge), _AIR_HU, region=lung)

    # -- the whole build --
    def build(self) -> Phantom:
        g, an = self.grid, self.an
        self._coarse()
        cv = _Canvas(g)
        self._base(cv)
        tree_rng = np.random.default_rng([self.seed, _STREAM_ANATOMY, an.p["tree_seed"]])
        self._tubes(cv, tree_rng)
        disease = _Disease(self, cv, np.random.default_rng([self.seed, _STREAM_DISEASE]))
        if self.ild:
            patterns = disease.draw(self.subtype)
        else:
            patterns = []
            disease.draw_benign(np.random.default_rng([self.seed, _STREAM_BENIGN]))
        cv.disease &= cv.lung
        n_lung = int(cv.lung.sum())
        frac = float(cv.disease.sum()) / max(n_lung, 1)
        self.info.update({k: v for k, v in disease.info.items() if k != "sev_field"})
        self.info["fraction"] = frac
        hu16 = self._finish(cv)
        body = np.broadcast_to(self.body2d, g.shape)
        labels = {
            "ild": self.ild, "subtype": self.subtype,
            "patterns": [q for q in PATTERNS if q in patterns],
            "seed": self.seed, "benign": list(disease.info.get("benign", [])),
            "disease_fraction": round(frac, 4),
        }
        report = _make_report(np.random.default_rng([self.seed, _STREAM_REPORT]), labels, self.info)
        return Phantom(hu=hu16, spacing_mm=tuple(g.spacing), origin_mm=tuple(g.origin),
                       direction=_DIRECTION, lung_mask=cv.lung, disease_mask=cv.disease,
                       airway_mask=cv.airway, labels=labels, report=report, body_mask=body)

    # -- pass 5: blur, noise, field of view, int16 --
    def _finish(self, cv: _Canvas):
        g = self.grid
        rng = np.random.default_rng([self.seed, _STREAM_NOISE])
        sx, sy, _ = g.spacing
        # One blur of (image + white noise) gives both the scanner point-spread (~0.6 mm) and
        # CT-like correlated noise; the white noise is scaled so that noise_hu holds after it.
        sig = (max(0.45, 0.6 / sy), max(0.45, 0.6 / sx))   # (rows, cols)
        gain = 1.0
        for s_ in sig:
            kern = np.exp(-0.5 * (np.arange(-int(4 * s_ + 0.5), int(4 * s_ + 0.5) + 1) / s_) ** 2)
            gain *= float(((kern / kern.sum()) ** 2).sum())
        amp = np.float32(self.noise_hu / math.sqrt(gain))
        out = np.empty(g.shape, np.int16)
        fov = None
        if self.padding_value is not None:
            r2 = (g.xs[None, :] ** 2 + g.ys[:, None] ** 2)
            fov = r2 > g.fov_radius ** 2
        for k in range(g.shape[0]):
            sl = cv.hu[k]
            if self.noise_hu > 0:
                sl = sl + amp * rng.standard_normal(sl.shape, dtype=np.float32)
            sl = ndimage.gaussian_filter(sl, sig, mode="nearest", truncate=4.0)
            out[k] = np.clip(np.rint(sl), -32000, 32000)
            if fov is not None:
                out[k][fov] = self.padding_value
        return out


# --------------------------------------------------------------------------------------------
# Disease
# --------------------------------------------------------------------------------------------
class _Disease:
    """Draws ILD patterns (or benign findings) into the canvas and records facts for the report."""

    def __init__(self, builder: _Builder, cv: _Canvas, rng):
        self.b, self.cv, self.rng = builder, cv, rng
        self.an, self.grid = builder.an, builder.grid
        self.info = {}
        b = builder
        zz, yy, xx = np.meshgrid(b.c_z, b.c_y, b.c_x, indexing="ij", sparse=True)
        self.c_h = ((zz - self.an.z_base) / self.an.H).astype(np.float32)
        self.c_post = np.clip((yy - self.an.yc) / self.an.cav[2], -1, 1).astype(np.float32)
        self.c_x = xx.astype(np.float32)
        self.lo = (b.c_z[0], b.c_y[0], b.c_x[0])
        self.hi = (b.c_z[-1], b.c_y[-1], b.c_x[-1])

    # coarse-grid fields ------------------------------------------------------------------
    def _patchy(self, feature_mm):
        f = _noise_field(self.rng, self.lo, self.hi, feature_mm)
        b = self.b
        pts = np.stack(np.meshgrid(b.c_x, b.c_y, b.c_z, indexing="ij"), -1)   # x,y,z
        vals = f.at(pts.reshape(-1, 3)).reshape(pts.shape[:3])                # (x,y,z)
        return np.ascontiguousarray(vals.transpose(2, 1, 0))

    def _field(self, data):
        return _Field(data, self.lo, self.b.cs)

    def _threshold(self, sev, fraction, mask=None):
        lung = self.b.c_lung if mask is None else mask
        vals = sev[lung]
        if vals.size == 0:
            return float("inf"), float("inf")
        t = float(np.quantile(vals, 1.0 - fraction))
        top = float(np.quantile(vals, 0.995))
        return t, max(top, t + 1e-6)

    # per-slice painting --------------------------------------------------------------------
    def _slices(self, fn, fields, lung_only=True):
        """Call ``fn(k, z, crop, sub_maps)`` on every slice holding lung, cropped to the lung box."""
        cv, g = self.cv, self.grid
        zany = np.nonzero(cv.lung.any(axis=(1, 2)))[0]
        if len(zany) == 0:
            return
        yany = np.nonzero(cv.lung.any(axis=(0, 2)))[0]
        xany = np.nonzero(cv.lung.any(axis=(0, 1)))[0]
        crop = (slice(yany[0], yany[-1] + 1), slice(xany[0], xany[-1] + 1))
        for f in fields:
            f.prepare(g.ys[crop[0]], g.xs[crop[1]])
        for k in zany:
            fn(int(k), float(g.zs[k]), crop)

    def draw(self, subtype) -> list:
        rng = self.rng
        if subtype == _IPF:
            return self._uip(rng)
        if subtype == _SSC:
            return self._nsip(rng)
        return self._hp(rng)

    # IPF / UIP ------------------------------------------------------------------------------
    def _uip(self, rng):
        an, b = self.an, self.b
        s = an.s
        target = rng.uniform(0.12, 0.28)
        h0 = rng.uniform(0.38, 0.5)
        lam = s * rng.uniform(6, 11)
        patch = self._patchy(rng.uniform(25, 45))
        sev = (_sigmoid((h0 - self.c_h) / 0.09) * np.exp(-b.c_pleura / lam)
               * (1 + 0.45 * self.c_post) * np.exp(0.55 * patch))
        # a little side-to-side asymmetry
        asym = rng.uniform(-0.25, 0.25)
        sev = sev * (1 + asym * np.sign(self.c_x))
        t, top = self._threshold(sev, target)
        want = {"reticulation"}
        if rng.random() < 0.85:
            want.add("honeycombing")
        if rng.random() < 0.8:
            want.add("traction bronchiectasis")
        if rng.random() < 0.15:
            want.add("ground-glass opacity")
        drawn = self._fibrosis(rng, sev, t, top, want, haze_hu=rng.uniform(-800, -740),
                               ggo_hu=rng.uniform(-620, -520), fine_mm=s * rng.uniform(3.5, 5.0),
                               line_mm=s * rng.uniform(0.4, 0.6))
        if "honeycombing" in want:
            n = self._honeycomb(rng, sev, t, top, depth_mm=s * rng.uniform(9, 18))
            if n:
                drawn.add("honeycombing")
        if "traction bronchiectasis" in want and self._traction(rng, sev, t, rng.integers(5, 13)):
            drawn.add("traction bronchiectasis")
        self.info.update(distribution="basal", subpleural=True, asym=asym)
        return drawn

    # SSc / NSIP ---------------------------------------------------------------------------
    def _nsip(self, rng):
        an, b = self.an, self.b
        s = an.s
        target = rng.uniform(0.12, 0.28)
        h0 = rng.uniform(0.4, 0.55)
        spare = s * rng.uniform(3.0, 6.0)
        patch = self._patchy(rng.uniform(30, 50))
        sev = (_sigmoid((h0 - self.c_h) / 0.1) * _smoothstep(b.c_pleura, 0.3 * spare, 1.6 * spare)
               * np.exp(-b.c_pleura / (s * rng.uniform(25, 40))) * (1 + 0.3 * self.c_post)
               * np.exp(0.25 * patch))
        t, top = self._threshold(sev, target)
        want = {"ground-glass opacity"}
        if rng.random() < 0.85:
            want.add("reticulation")
        if rng.random() < 0.5:
            want.add("traction bronchiectasis")
        if rng.random() < 0.1:
            want.add("honeycombing")
        drawn = self._fibrosis(rng, sev, t, top, want, haze_hu=None, ggo_hu=rng.uniform(-560, -380),
                               fine_mm=s * rng.uniform(3.0, 4.0), line_mm=s * rng.uniform(0.3, 0.45),
                               line_gain=0.6)
        if "honeycombing" in want and self._honeycomb(rng, sev, t, top, depth_mm=s * 6, sparse=0.2):
            drawn.add("honeycombing")
        if "traction bronchiectasis" in want and self._traction(rng, sev, t, rng.integers(3, 8)):
            drawn.add("traction bronchiectasis")
        self.info.update(distribution="basal", subpleural=False, sparing=True)
        return drawn

    # HP -------------------------------------------------------------------------------------
    def _hp(self, rng):
        an, b = self.an, self.b
        s = an.s
        target = rng.uniform(0.12, 0.3)
        h0 = rng.uniform(0.35, 0.5)
        patch = self._patchy(rng.uniform(20, 35))
        sev = (_sigmoid((self.c_h - h0) / 0.12) * np.exp(0.9 * patch)
               * (1 - 0.4 * np.exp(-b.c_pleura / (6 * s))))
        want = {"ground-glass opacity"}
        if rng.random() < 0.85:
            want.add("mosaic attenuation")
        if rng.random() < 0.8:
            want.add("centrilobular nodules")
        if rng.random() < 0.6:
            want.add("reticulation")
            if rng.random() < 0.4:
                want.add("traction bronchiectasis")
        zone_share = 0.7 if "mosaic attenuation" in want else 1.0
        t, top = self._threshold(sev, target * zone_share)
        mosaic = None
        if "mosaic attenuation" in want:
            lob = self._patchy(rng.uniform(12, 20))
            rest = b.c_lung & (sev <= t)
            # the dark lobules take the rest of the target, drawn from the lung outside the zone
            share = target * (1 - zone_share) * b.c_lung.sum() / max(rest.sum(), 1)
            # candidate region twice that size; half of its secondary lobules (Voronoi cells
            # 10-18 mm across) trap air, which gives the sharp polygonal margins
            t_m, _ = self._threshold(lob, min(2 * share, 0.9), rest)
            tree = self._cells(rng, s * rng.uniform(10, 16), rest & (lob > t_m), jitter=0.4)
            if tree is not None:
                dark = rng.random(tree.n) < 0.5
                mosaic = (self._field(lob), t_m, rng.uniform(-950, -920), tree, dark)
        drawn = self._fibrosis(rng, sev, t, top, want, haze_hu=None, ggo_hu=rng.uniform(-560, -420),
                               fine_mm=s * rng.uniform(4.0, 5.5), line_mm=s * rng.uniform(0.3, 0.45),
                               line_gain=0.55, mosaic=mosaic, ggo_patchy=True)
        if "centrilobular nodules" in want and self._nodules(rng, sev, t):
            drawn.add("centrilobular nodules")
        if "traction bronchiectasis" in want and self._traction(rng, sev, t, rng.integers(2, 6)):
            drawn.add("traction bronchiectasis")
        self.info.update(distribution="upper", subpleural=False)
        return drawn

    # shared painters ------------------------------------------------------------------------
    def _cells(self, rng, spacing_mm, mask, keep=1.0, jitter=0.45):
        """Voronoi cell seeds (a KD-tree) on a jittered, thinned lattice inside a coarse mask."""
        pts = self._lattice_points(rng, spacing_mm, mask, jitter=jitter)
        if keep < 1.0:
            pts = pts[rng.random(len(pts)) < keep]
        return cKDTree(pts) if len(pts) >= 2 else None

    @staticmethod
    def _wall_distance(tree, xs, ys, z):
        """Approximate distance (mm) to the nearest Voronoi cell wall, and to the nearest seed."""
        pts = np.column_stack([xs, ys, np.full(len(xs), z)])
        d, _ = tree.query(pts, k=2)
        return 0.5 * (d[:, 1] - d[:, 0]), d[:, 0]

    def _fibrosis(self, rng, sev, t, top, want, *, haze_hu, ggo_hu, fine_mm, line_mm,
                  line_gain=1.0, mosaic=None, ggo_patchy=False):
        """Per-slice diffuse patterns in the zone ``sev > t``: haze, ground glass, a net of
        reticular lines (walls of 3-D Voronoi cells at two scales: intralobular and septal),
        and mosaic attenuation outside the zone."""
        cv, g = self.cv, self.grid
        f_sev = self._field(sev)
        fields = [f_sev]
        zone_c = self.b.c_lung & (sev > t)
        if not zone_c.any():
            return set()
        lines = "reticulation" in want
        if lines:
            grown = ndimage.binary_dilation(zone_c, iterations=1)
            fine = self._cells(rng, fine_mm, grown, jitter=0.45)
            septal = self._cells(rng, fine_mm * rng.uniform(2.2, 3.0), grown, jitter=0.4)
            lines = fine is not None and septal is not None
        line_hu = rng.uniform(-150, 0)
        ggo = "ground-glass opacity" in want
        f_gpatch = None
        if ggo and ggo_patchy:
            f_gpatch = _noise_field(rng, self.lo, self.hi, 14.0)
            fields.append(f_gpatch)
        if mosaic is not None:
            fields.append(mosaic[0])
        span = np.float32(top - t)
        edge = np.float32(max(0.5 * min(g.spacing[:2]), 0.3))
        seen = {"zone": 0, "lines": 0, "ggo": 0, "mosaic": 0}

        def paint(k, z, crop):
            lung = cv.lung[k][crop]
            sv = f_sev.plane(z)
            zone = (sv > t) & lung
            hu = cv.hu[k][crop]
            dis = cv.disease[k][crop]
            if mosaic is not None:
                f_m, t_m, dark_hu, tree, dark_flag = mosaic
                mf = f_m.plane(z)
                cand = (mf > t_m) & lung & ~zone
                if cand.any():
                    zy, zx = np.nonzero(cand)
                    pts = np.column_stack([g.xs[crop[1]][zx], g.ys[crop[0]][zy], np.full(len(zx), z)])
                    dk = dark_flag[tree.query(pts, k=1)[1]]
                    zy, zx = zy[dk], zx[dk]
                    v = hu[zy, zx]
                    w = (np.clip((mf[zy, zx] - t_m) * 6.0, 0, 1) * (v < -700)).astype(np.float32)
                    hu[zy, zx] = v + w * (dark_hu - v)
                    dis[zy, zx] = True
                    seen["mosaic"] += len(zy)
            if not zone.any():
                return
            inten = np.clip((sv - t) / span, 0, 1) * zone
            # fade in over the first part of the zone so its border is not a hard edge
            ramp = np.clip((sv - t) / (0.12 * span), 0, 1) * zone
            dis |= zone
            seen["zone"] += int(zone.sum())
            parenchyma = (hu > -980) & (hu < -300)
            if haze_hu is not None:
                w = (0.25 + 0.75 * inten) * ramp * parenchyma
                hu += w * np.maximum(haze_hu - hu, 0)
            if ggo:
                w = (0.45 + 0.55 * np.sqrt(inten)) * ramp
                if f_gpatch is not None:
                    w = w * np.clip(0.75 + 0.5 * f_gpatch.plane(z), 0.2, 1.0)
                w = w * (hu > -980) * (hu < ggo_hu)
                hu += w * (ggo_hu - hu)
                seen["ggo"] += int((w > 0.3).sum())
            if lines:
                zy, zx = np.nonzero(zone)
                xs, ys = g.xs[crop[1]][zx], g.ys[crop[0]][zy]
                df, _ = self._wall_distance(fine, xs, ys, z)
                ds, _ = self._wall_distance(septal, xs, ys, z)
                wf = np.clip((line_mm - df) / edge + 0.5, 0, 1) * 0.8
                ws = np.clip((1.4 * line_mm - ds) / edge + 0.5, 0, 1)
                wl = (np.maximum(wf, ws) * (0.45 + 0.55 * np.sqrt(inten[zy, zx])) * ramp[zy, zx]
                      * line_gain)
                v = hu[zy, zx]
                hu[zy, zx] = v + wl.astype(np.float32) * np.maximum(line_hu - v, 0)
                seen["lines"] += int((wl > 0.4).sum())

        self._slices(paint, fields)
        drawn = set()
        if seen["lines"]:
            drawn.add("reticulation")
        if seen["ggo"]:
            drawn.add("ground-glass opacity")
        if seen["mosaic"]:
            drawn.add("mosaic attenuation")
        return drawn

    def _lattice_points(self, rng, spacing_mm, mask, jitter=0.35):
        """Jittered lattice points (x, y, z mm) at ``spacing_mm`` inside a coarse-grid mask."""
        if not mask.any():
            return np.zeros((0, 3))
        b = self.b
        kz, ky, kx = np.nonzero(mask)
        cs = b.cs
        lo = np.array([b.c_x[kx.min()], b.c_y[ky.min()], b.c_z[kz.min()]]) - cs
        hi = np.array([b.c_x[kx.max()], b.c_y[ky.max()], b.c_z[kz.max()]]) + cs
        axes = [np.arange(l, h, spacing_mm) for l, h in zip(lo, hi)]
        pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        if len(pts) > 600_000:   # keep the work bounded on tiny spacings
            pts = pts[rng.choice(len(pts), 600_000, replace=False)]
        pts = pts + rng.uniform(-jitter, jitter, pts.shape) * spacing_mm
        m = _Field(mask.astype(np.float32), self.lo, cs).at(pts) > 0.5
        return pts[m]

    def _honeycomb(self, rng, sev, t, top, *, depth_mm, sparse=1.0):
        """Clusters of thick-walled air cysts (3-10 mm) stacked in subpleural rows at the bases.

        The cysts are rounded Voronoi cells of seeds in the subpleural band, so neighbouring
        cysts share their walls. Returns the number of cyst lumen voxels drawn.
        """
        an, b, cv, g = self.an, self.b, self.cv, self.grid
        s = an.s
        hc_t = t + (top - t) * rng.uniform(0.1, 0.3)
        zone = (b.c_lung & (sev > hc_t) & (b.c_pleura < depth_mm) & (self.c_h < 0.5))
        if sparse < 1.0:
            zone &= self._patchy(20.0) > 1.0
        spacing = s * rng.uniform(3.6, 4.6)
        tree = self._cells(rng, spacing, zone, keep=0.55, jitter=0.45)
        if tree is None:
            return 0
        wall = s * rng.uniform(0.5, 0.8)          # half wall thickness
        r_cap = s * rng.uniform(3.5, 5.0)         # largest cyst radius
        lumen_hu, wall_hu = rng.uniform(-1000, -965), rng.uniform(-80, 20)
        edge = np.float32(max(0.5 * min(g.spacing[:2]), 0.3))
        f_p = b.f_pleura
        z_top = an.z_at(0.55)
        lumen_count = [0]

        def paint(k, z, crop):
            if z > z_top:
                return
            lung = cv.lung[k][crop]
            near = lung & (f_p.plane(z) < depth_mm + r_cap)
            if not near.any():
                return
            zy, zx = np.nonzero(near)
            xs, ys = g.xs[crop[1]][zx], g.ys[crop[0]][zy]
            dw, d1 = self._wall_distance(tree, xs, ys, z)
            cell = d1 < r_cap + 2 * wall
            if not cell.any():
                return
            zy, zx, dw, d1 = zy[cell], zx[cell], dw[cell], d1[cell]
            lum = (np.clip((dw - wall) / edge + 0.5, 0, 1)
                   * np.clip((r_cap - d1) / edge + 0.5, 0, 1)).astype(np.float32)
            hu = cv.hu[k][crop]
            hu[zy, zx] = lum * lumen_hu + (1 - lum) * np.maximum(hu[zy, zx], wall_hu)
            cv.disease[k][crop][zy, zx] = True
            lumen_count[0] += int((lum > 0.5).sum())

        self._slices(paint, [f_p])
        self.info["honeycomb_voxels"] = lumen_count[0]
        return lumen_count[0]

    def _traction(self, rng, sev, t, n_paths):
        """Dilated, tortuous airways with thick walls, running out to the pleura in the fibrosis."""
        an, b, cv, g = self.an, self.b, self.cv, self.grid
        s = an.s
        zone = b.c_lung & (sev > t) & (b.c_pleura > 8 * s) & (b.c_pleura < 35 * s)
        cand = self._lattice_points(rng, 6 * s, zone)
        if len(cand) == 0:
            return False
        n_paths = int(min(n_paths, len(cand)))
        pos = cand[rng.choice(len(cand), n_paths, replace=False)]
        step = 2.5 * s
        eps = 2.0 * s

        def outward(p):
            grad = np.stack([b.f_pleura.at(p + np.eye(3)[i] * eps) - b.f_pleura.at(p - np.eye(3)[i] * eps)
                             for i in range(3)], 1)
            return -_normalize(grad)
        d = outward(pos)
        r = s * rng.uniform(1.3, 2.0, n_paths)
        alive = np.ones(n_paths, bool)
        p0s, p1s, rs = [], [], []
        phase = rng.uniform(0, 2 * np.pi, n_paths)
        for i in range(int(rng.integers(8, 16))):
            d = _normalize(0.55 * d + 0.35 * outward(pos) + 0.45 * rng.normal(size=d.shape))
            nxt = pos + d * step
            alive &= b.f_depth.at(nxt) > 0.6 * r
            rr = r * (1 + 0.08 * i) * (1 + 0.25 * np.sin(phase + i * 1.3))   # varicose
            if not alive.any():
                break
            p0s.append(pos[alive]), p1s.append(nxt[alive]), rs.append(rr[alive])
            pos = nxt
        if not p0s:
            return False
        p0, p1, rr = np.concatenate(p0s), np.concatenate(p1s), np.concatenate(rs)
        wall = s * rng.uniform(0.8, 1.3)
        edge = max(g.voxel_mm * 0.8, 0.4)
        iw, ww = cv.paint(_tube_chunks(g, p0, p1, rr + wall, rr + wall, edge), an.hu["wall"], region=cv.lung)
        il, wl = cv.paint(_tube_chunks(g, p0, p1, rr, rr, edge), _AIR_HU, region=cv.lung)
        cv.disease.reshape(-1)[iw[ww > 0.5]] = True
        self.info["traction_paths"] = int(n_paths)
        return bool((wl > 0.5).any())

    def _nodules(self, rng, sev, t):
        """Ill-defined centrilobular ground-glass nodules, sparing the subpleural lung."""
        an, b, cv, g = self.an, self.b, self.cv, self.grid
        s = an.s
        zone = b.c_lung & (sev > t * rng.uniform(0.7, 1.0)) & (b.c_pleura > 4 * s)
        pts = self._lattice_points(rng, s * rng.uniform(5.5, 8.0), zone)
        if len(pts) == 0:
            return False
        pts = pts[b.f_pleura.at(pts) > 5 * s]
        pts = pts[rng.random(len(pts)) < 0.8]
        if len(pts) == 0:
            return False
        r = s * rng.uniform(1.2, 2.2, len(pts))
        idx, w = cv.paint(_tube_chunks(g, pts, pts, r, r, max(1.8 * s, g.voxel_mm)),
                          rng.uniform(-380, -250), region=cv.lung, amplitude=rng.uniform(0.85, 1.0),
                          only_below=-250)
        cv.disease.reshape(-1)[idx[w > 0.35]] = True
        return bool((w > 0.35).any())

    # normals -------------------------------------------------------------------------------
    def draw_benign(self, rng):
        an, b, cv, g = self.an, self.b, self.cv, self.grid
        s = an.s
        benign = []
        if rng.random() < 0.35:   # small solid nodule
            cand = self._lattice_points(rng, 10 * s, b.c_lung & (b.c_depth > 12 * s))
            if len(cand):
                c = cand[rng.integers(len(cand))]
                diam = rng.uniform(3.5, 7.0) * max(s, 0.5)
                _, w = cv.paint(_tube_chunks(g, c[None], c[None], diam / 2, diam / 2, max(g.voxel_mm * 0.7, 0.4)),
                                rng.uniform(10, 60), region=cv.lung)
                if (w > 0.5).any():
                    benign.append("pulmonary nodule")
                    self.info["nodule"] = {"diam_mm": diam, "loc": _lobe(an, c)}
        if rng.random() < 0.3:    # thin dependent atelectasis at the posterior bases
            thick = s * rng.uniform(2.5, 5.0)
            hu_v = rng.uniform(-450, -250)
            f_p = b.f_pleura
            seen = [0]

            def paint(k, z, crop):
                h = (z - an.z_base) / an.H
                if h > 0.4:
                    return
                lung = cv.lung[k][crop]
                post = (g.ys[crop[0]][:, None] - an.yc) / an.cav[2] > 0.45
                dp = f_p.plane(z)
                w = np.clip((thick - dp) / max(thick * 0.5, 0.5), 0, 1) * lung * post
                hu = cv.hu[k][crop]
                w = w * (hu < -300)
                hu += w * (hu_v - hu)
                seen[0] += int((w > 0.5).sum())
            self._slices(paint, [f_p])
            if seen[0]:
                benign.append("dependent atelectasis")
        self.info["benign"] = benign


def _lobe(an: _Anatomy, c):
    x, y, z = c
    h = (z - an.z_base) / an.H
    if x < 0:
        if h > 0.58:
            return "right upper lobe"
        if h > 0.3 and y < an.yc:
            return "right middle lobe"
        return "right lower lobe"
    return "left upper lobe" if h > 0.5 else "left lower lobe"


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------
def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _make_report(rng, labels, info) -> str:
    """A synthetic report consistent with ``labels``; wording, order and optional sentences vary."""
    pats = set(labels["patterns"])
    sub = labels["subtype"]
    frac = info.get("fraction", 0.0)
    severity = "mild" if frac < 0.14 else ("moderate" if frac < 0.24 else "extensive")
    lung, airways, pleura, heart, impression = [], [], [], [], []

    if labels["ild"]:
        bases = _pick(rng, ["lung bases", "lower lobes", "lower zones"])
        upper = _pick(rng, ["upper and mid zones", "upper lobes", "upper and middle lung zones"])
        where = bases if info.get("distribution") == "basal" else upper
        if "reticulation" in pats:
            if sub == _IPF:
                lung.append(_pick(rng, [
                    f"Subpleural, basal-predominant reticulation, most marked in the {bases}.",
                    "There is bilateral subpleural reticulation with a basal and posterior predominance.",
                    f"Peripheral reticulation is seen in both lungs, worst in the {bases}.",
                ]))
            elif sub == _SSC:
                lung.append(_pick(rng, [
                    f"Fine reticulation is superimposed on the ground-glass change in the {bases}.",
                    f"There is fine intralobular reticulation in the {bases}.",
                ]))
            else:
                lung.append(_pick(rng, [
                    f"Some reticulation is present in the {where}.",
                    "Mild reticulation accompanies the ground-glass change.",
                ]))
        if "ground-glass opacity" in pats:
            if sub == _SSC:
                lung.insert(0, _pick(rng, [
                    f"Bilateral symmetric ground-glass opacity in the {bases} with relative sparing of the immediate subpleural lung.",
                    "Basal-predominant ground-glass opacity, symmetric, with subpleural sparing.",
                    f"There is ground-glass opacity in the {bases}, sparing the immediate subpleural region.",
                ]))
            elif sub == _HP:
                lung.insert(0, _pick(rng, [
                    f"Patchy ground-glass opacity in the {upper}.",
                    f"There is patchy, bilateral ground-glass opacity predominantly in the {upper}.",
                    f"Geographic ground-glass opacity involves the {upper}.",
                ]))
            else:
                lung.append(_pick(rng, [
                    "Minor ground-glass opacity within the fibrotic areas.",
                    "There is a little ground-glass opacity in the affected lung.",
                ]))
        if "honeycombing" in pats:
            lung.append(_pick(rng, [
                f"Honeycombing is present in the subpleural {bases}.",
                "Subpleural honeycombing with stacked cysts in several rows at both bases.",
                f"Clustered thick-walled subpleural cysts at the {bases} in keeping with honeycombing.",
            ]))
        elif sub == _SSC and rng.random() < 0.6:
            lung.append(_pick(rng, ["No honeycombing.", "Honeycombing is not seen."]))
        if "centrilobular nodules" in pats:
            lung.append(_pick(rng, [
                "Numerous ill-defined centrilobular nodules.",
                f"Scattered poorly defined centrilobular nodules in the {upper}.",
                "Centrilobular nodules of ground-glass density are noted.",
            ]))
        if "mosaic attenuation" in pats:
            lung.append(_pick(rng, [
                "Mosaic attenuation with lobular areas of decreased attenuation, suggesting air trapping.",
                "There is mosaic attenuation with sharply marginated lobules of low attenuation.",
                "Lobular areas of low attenuation produce mosaic attenuation.",
            ]))
        lung.append(_pick(rng, [
            f"The overall extent of disease is {severity}.",
            f"Disease extent: {severity}.",
            f"The abnormality is {severity} in extent.",
        ]))
        if rng.random() < 0.5:
            lung.append(_pick(rng, ["No consolidation.", "No focal consolidation.", "No suspicious pulmonary nodule."]))
        if "traction bronchiectasis" in pats:
            airways.append(_pick(rng, [
                f"Traction bronchiectasis within the fibrotic areas of the {where}.",
                "There is traction bronchiectasis and bronchiolectasis in the affected lung.",
                "Dilated, distorted airways within the abnormal lung consistent with traction bronchiectasis.",
            ]))
        airways.append(_pick(rng, ["The trachea and main bronchi are patent.", "Central airways are patent.",
                                   "The central airways are clear."]))
        if rng.random() < 0.4:
            pleura.append(_pick(rng, ["Mild pleural thickening at the bases.", "No pleural effusion."]))
        else:
            pleura.append(_pick(rng, ["No pleural effusion or pneumothorax.", "No pleural effusion.",
                                      "Pleural surfaces are unremarkable."]))
        heart.append(_pick(rng, ["Heart size is normal.", "The heart is not enlarged.", "Normal heart size."]))
        heart.append(_pick(rng, ["No mediastinal lymphadenopathy.", "Mildly enlarged mediastinal lymph nodes, likely reactive.",
                                 "No pericardial effusion."]))

        if sub == _IPF:
            typical = "honeycombing" in pats
            impression.append(_pick(rng, [
                f"{'Usual' if typical else 'Probable usual'} interstitial pneumonia (UIP) pattern, consistent with idiopathic pulmonary fibrosis.",
                f"Fibrotic interstitial lung disease in a {'typical' if typical else 'probable'} UIP pattern, most consistent with idiopathic pulmonary fibrosis.",
                f"{'Usual' if typical else 'Probable usual'} interstitial pneumonia pattern; in the appropriate clinical setting, idiopathic pulmonary fibrosis.",
            ]))
        elif sub == _SSC:
            impression.append(_pick(rng, [
                "Nonspecific interstitial pneumonia (NSIP) pattern, consistent with interstitial lung disease related to systemic sclerosis.",
                "Basal ground-glass opacity and fine reticulation with subpleural sparing: NSIP pattern, in keeping with systemic sclerosis-associated interstitial lung disease.",
                "Interstitial lung disease in an NSIP pattern, compatible with systemic sclerosis.",
            ]))
        else:
            fib = "reticulation" in pats
            impression.append(_pick(rng, [
                f"{'Fibrotic' if fib else 'Non-fibrotic'} hypersensitivity pneumonitis is the most likely diagnosis.",
                f"Findings compatible with {'fibrotic ' if fib else ''}hypersensitivity pneumonitis.",
                "Upper-zone predominant ground-glass opacity" + (", centrilobular nodules" if "centrilobular nodules" in pats else "")
                + (" and mosaic attenuation" if "mosaic attenuation" in pats else "") + ", consistent with hypersensitivity pneumonitis.",
            ]))
        if rng.random() < 0.5:
            impression.append(_pick(rng, ["Recommend multidisciplinary discussion.",
                                          "Comparison with prior imaging would help assess progression.",
                                          "Pulmonary function testing is suggested."]))
    else:
        lung.append(_pick(rng, [
            "The lungs are clear.", "No interstitial abnormality.", "Normal lung parenchyma.",
            "No reticulation, ground-glass opacity or honeycombing.",
        ]))
        nod = info.get("nodule")
        if nod:
            lung.append(_pick(rng, [
                f"A {nod['diam_mm']:.0f} mm solid nodule in the {nod['loc']}.",
                f"There is a {nod['diam_mm']:.0f} mm solid pulmonary nodule in the {nod['loc']}, likely benign.",
            ]))
        if "dependent atelectasis" in labels.get("benign", []):
            lung.append(_pick(rng, ["Mild dependent atelectasis at the lung bases.",
                                    "Minor dependent subpleural atelectasis posteriorly at both bases."]))
        if rng.random() < 0.5:
            lung.append(_pick(rng, ["No consolidation.", "No pneumothorax.", "No emphysema."]))
        airways.append(_pick(rng, ["The trachea and main bronchi are patent.", "Central airways are patent.",
                                   "No bronchiectasis or bronchial wall thickening."]))
        pleura.append(_pick(rng, ["No pleural effusion or pneumothorax.", "No pleural effusion.",
                                  "Pleural surfaces are unremarkable."]))
        heart.append(_pick(rng, ["Heart size is normal.", "The heart is not enlarged.", "Normal heart size."]))
        if rng.random() < 0.6:
            heart.append(_pick(rng, ["No mediastinal lymphadenopathy.", "No pericardial effusion."]))
        impression.append(_pick(rng, [
            "No evidence of interstitial lung disease.", "No CT features of interstitial lung disease.",
            "Normal chest CT. No interstitial lung disease.",
        ]))
        if nod:
            impression.append(f"{nod['diam_mm']:.0f} mm pulmonary nodule in the {nod['loc']}, likely benign.")

    # shuffle the non-leading sentences a little so order varies
    if len(lung) > 2:
        head, rest = lung[:1], lung[1:]
        rng.shuffle(rest)
        lung = head + rest
    if len(heart) > 1 and rng.random() < 0.5:
        heart.reverse()
    return ("FINDINGS:\n"
            f"LUNG PARENCHYMA: {' '.join(lung)}\n"
            f"AIRWAYS: {' '.join(airways)}\n"
            f"PLEURA: {' '.join(pleura)}\n"
            f"HEART AND MEDIASTINUM: {' '.join(heart)}\n"
            "\nIMPRESSION:\n"
            + "\n".join(f"{i + 1}. {line}" for i, line in enumerate(impression)))
