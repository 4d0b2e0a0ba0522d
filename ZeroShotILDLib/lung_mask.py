"""Step 2 of the pipeline: segment the lungs (paper 000: -400 HU threshold + morphology + hole filling).

``segment_lungs`` returns a boolean mask [z, y, x] of both lungs, with vessels, airway walls and
dense (fibrotic, ground-glass, consolidated) tissue inside the lungs included, and the trachea and
main bronchi excluded. The steps, and the reason for each:

0. Body (``segment_body``): the lungs lie inside the patient, so only air inside the body is a
   candidate. The body is found from the patient, never from the array's borders or a table
   position: on a ~2.5 mm grid (along z only for thin slices), soft tissue (> ``BODY_HU``) is
   opened by ``BODY_OPEN_MM`` per slice, which cuts the thin shells of a table or cushion where
   they touch the skin, and the largest 3-D connected piece is the patient; each slice of it is
   then filled. A background region enclosed by the body (lungs, airways, bowel gas) is inside.
   One that reaches the image edge is inside only where the crop cuts through the lung: its
   median is denser than gas (> ``OUTSIDE_AIR_HU``), the body makes at least
   ``CROP_WALL_FRACTION`` of its boundary, and in 3-D it never joins a region outside the body
   (a mattress pressed between the body and the image edge does). Outside air is gas, and the
   foam core of a table (lung-like density) is bounded by the table's shells, not by the body.
   The table can be anywhere (posterior supine, anterior prone, lateral), as wide as the field
   of view, touching the body, and the array stored in any in-plane flip or rotation: this step
   looks at no direction. (Step 4 splits the lungs at the array column that halves them; on an
   array stored transposed the split runs front to back, and the mask still agrees with the
   upright one to Dice >= 0.99: ``Testing/test_body_mask.py``.)
1. Threshold: voxels below ``threshold_hu`` (-400 HU) inside the body are air or aerated lung.
2. 3-D connected components of that air are sorted into lung and not-lung. Air outside the body,
   in the stomach or bowel, and scanner padding is *gas*: the interior of such a component is
   almost entirely below ``airway_hu`` (-950 HU), while lung parenchyma (vessels, septa, partial
   volume) sits around -850 HU. This test replaces "drop air touching the image border": tight
   chest crops cut through the lungs on every side (the lungs touch the in-plane border and the
   first/last slices), and a border rule would delete them. Components smaller than
   ``min_component_ml`` are dropped.
3. Trachea and main bronchi: a round, dark (< ``airway_hu``), medial cross-section in the first or
   last slices of the lung region is the trachea; the airway lumen is grown from it in 3-D
   (below ``airway_hu``), with a leak check that falls back to stricter thresholds and finally to
   the tracked trachea alone. The grown airways, widened by the wall's partial volume, are removed.
4. Per axial slice (so memory stays bounded and sparse series work): closing (``closing_mm``)
   pulls vessels and dense subpleural tissue in; a wider *rim* closing (``rim_mm``) restricted to
   soft-tissue-dense voxels next to the lung brings in the fibrotic subpleural band that the
   threshold misses; holes are filled (vessels, nodules, fibrosis; not the mediastinum: a hole
   that holds airway or is larger than ``max_hole_cm2`` stays out); opening (``opening_mm``)
   cuts thin bridges; erosion (``erosion_mm``, default 0) last. Radii are in mm and respect the
   in-plane spacing (Euclidean distance transforms, so anisotropic pixels are handled exactly).

``working_spacing_mm`` segments on a coarser grid (block means of HU) and interpolates the mask
back; see ``bench/bench_lung_mask.py`` for its Dice against full resolution and speed-up.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import edt
import numpy as np
from scipy import ndimage as ndi

from . import scan_padding
from .errors import InputError
from .progress import CancelToken, ProgressCallback, resolve
from .settings import LungMaskSettings

STAGE = "lung mask"
#: More threads than this gain little on per-slice work of a few milliseconds each.
MAX_WORKER_THREADS = 8
#: A component whose eroded interior is at least this fraction below ``airway_hu`` is gas.
GAS_CORE_FRACTION = 0.6
#: Small components with this much dark interior are bowel gas mixed with contents, not lung.
MIXED_GAS_CORE_FRACTION = 0.3
MIXED_GAS_MAX_ML = 100.0
#: Lung components smaller than this fraction of the largest are dropped (bowel, artefacts).
RELATIVE_MIN_FRACTION = 0.02
#: Trachea cross-section limits (adult trachea 13-25 mm wide; main bronchi smaller).
TRACHEA_AREA_MM2 = (40.0, 900.0)
#: How far from each end of the lung region the trachea is looked for.
TRACHEA_SEARCH_MM = 20.0
TRACHEA_DARK_MARGIN_HU = 50.0
#: Airway trees above this volume have leaked into the parenchyma.
MAX_AIRWAY_ML = 250.0
#: Dense subpleural band: width closed over, and the HU range that counts as lung tissue.
RIM_MM = 12.0
RIM_HU = (-400.0, 100.0)
#: ...and whose neighbourhood (``RIM_WINDOW_MM`` box) averages in this range: fibrotic lung mixes
#: dense walls with air, so it averages well below solid tissue; the mediastinum (fat -100 HU,
#: soft tissue +40 HU) and the chest wall do not, and stay out.
RIM_MEAN_HU = (-900.0, -200.0)
RIM_WINDOW_MM = 5.0
#: How far (mm) dense lung connected to the aerated lung is followed.
DENSE_GROW_MM = 25.0
GROUND_GLASS_MAX_HU = -200.0
#: Holes larger than this (cm^2) are the mediastinum enclosed by touching lungs, not lung.
MAX_HOLE_CM2 = 30.0
AIRWAY_WALL_MM = 1.5
#: Body: soft tissue above this HU (fat is -100, foam cushions and table cores below -800).
BODY_HU = -500.0
#: Opening radius (mm) that cuts table shells and bridges up to twice as thick from the body;
#: chest walls are thicker (skin, fat, muscle and ribs), so the lungs stay enclosed.
BODY_OPEN_MM = 3.0
#: In-plane grid of the body mask (mm): the skin needs no finer line, and it keeps the cost low.
BODY_WORKING_MM = 2.5
#: A region reaching the image edge with its median at or below this HU is gas (outside air).
OUTSIDE_AIR_HU = -950.0
#: ...and one denser than that is lung cut by the crop only if the body bounds this much of it.
CROP_WALL_FRACTION = 0.9
#: Holes up to this size (cm^2) are always filled (vessels, nodules).
SMALL_HOLE_CM2 = 3.0
#: Larger holes whose median is denser than this (HU) are solid organ (liver or heart dome).
ORGAN_HU = -100.0


def lung_volume_ml(mask: np.ndarray, spacing_mm) -> float:
    """Volume of a boolean mask in mL (voxel count x voxel volume in mm^3 / 1000)."""
    return float(np.count_nonzero(mask)) * float(np.prod(np.asarray(spacing_mm, dtype=np.float64))) / 1000.0


def _volume_and_spacing(hu, spacing_mm, what: str) -> tuple:
    """``hu`` as a 3-D array and ``spacing_mm`` as three positive floats, or a one-line ``InputError``."""
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise InputError(f"{what} needs a 3-D [z, y, x] volume, got {hu.ndim}-D: give a CT volume")
    spacing = tuple(float(v) for v in spacing_mm)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise InputError(f"spacing {spacing_mm} mm is invalid: give three positive numbers (x, y, z)")
    return hu, spacing


def segment_body(hu: np.ndarray, spacing_mm, *, cancel: Optional[CancelToken] = None) -> np.ndarray:
    """Boolean mask [z, y, x] of the patient's body with everything inside it (lungs, airways, gut).

    Not the table, mattress, cushions, arms lying apart, or the air around; see step 0 of the
    module docstring. Computed on a grid of about ``BODY_WORKING_MM`` (along z only for thin
    slices: a sparse series keeps every slice) and brought back by nearest neighbour.
    """
    _, cancel = resolve(None, cancel)
    hu, spacing = _volume_and_spacing(hu, spacing_mm, "the body mask")
    coarse, (fz, fy, fx) = _body_grid(hu, spacing, cancel)
    small = _body_coarse(coarse, (spacing[1] * fy, spacing[0] * fx), cancel)
    out = np.empty(hu.shape, dtype=bool)
    for z in range(hu.shape[0]):
        out[z] = _body_slice_up(small[z // fz], hu.shape[1:], fy, fx)
    return out


def segment_lungs(hu: np.ndarray, spacing_mm, settings: Optional[LungMaskSettings] = None, *,
                  progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                  working_spacing_mm: Optional[float] = None, source: str = "",
                  direction=None) -> np.ndarray:
    """Boolean lung mask [z, y, x] of a CT in HU.

    Parameters
    ----------
    hu : ndarray [z, y, x]
        Hounsfield units (any integer or float dtype; padding at or below -1500 HU is treated as air).
    spacing_mm : (x, y, z)
        Voxel size in mm, as SimpleITK reports it.
    settings : LungMaskSettings, optional
        threshold_hu (-400), min_component_ml (5), opening_mm (2), closing_mm (6), erosion_mm (0),
        airway_hu (-950), fill_holes (True).
    progress : callable, optional
        ``progress("lung mask", done, total)`` called between units of work.
    cancel : CancelToken, optional
        Polled between units of work; raises ``errors.Cancelled``.
    working_spacing_mm : float, optional
        If set and coarser than the scan, segment on a grid of about this spacing (mm) and
        interpolate the mask back to the scan's grid. Default None: full resolution.
    source : str
        Name of the scan for error messages.
    direction : 9 floats, optional
        The scan's direction cosines (row-major, SimpleITK order). When given and the array's
        columns run front to back rather than left to right (an array stored transposed), the
        lungs are segmented on the transposed array, so the left/right split of step 4 is
        between the lungs; the mask is returned in the array's own order. None: the columns are
        taken as left-right (the body and every other step do not depend on it).

    Returns
    -------
    ndarray of bool, same shape as ``hu``.

    Raises
    ------
    InputError
        No lung was found (not a chest CT, or not in HU).
    """
    s = settings or LungMaskSettings()
    progress, cancel = resolve(progress, cancel)
    hu, spacing = _volume_and_spacing(hu, spacing_mm, "lung segmentation")
    if direction is not None and _columns_run_front_to_back(direction):
        upright = np.ascontiguousarray(hu.transpose(0, 2, 1))
        mask = segment_lungs(upright, (spacing[1], spacing[0], spacing[2]), s, progress=progress, cancel=cancel,
                             working_spacing_mm=working_spacing_mm, source=source)
        return np.ascontiguousarray(mask.transpose(0, 2, 1))
    # Constant bands (a crop pasted on a canvas, a gantry-tilt shear) are the field of view's edge,
    # not air: a lung cut by the crop that touches them stays lung (see ``scan_padding``).
    padding = scan_padding.find_padding(hu)
    if padding is not None:
        inner, band = scan_padding.unpadded(hu, padding)
        small = _segment_on_grid(inner, spacing, s, progress, cancel, working_spacing_mm, source)
        return scan_padding.paste(small, band, hu.shape, padding)
    return _segment_on_grid(hu, spacing, s, progress, cancel, working_spacing_mm, source)


def _segment_on_grid(hu, spacing, s, progress, cancel, working_spacing_mm, source) -> np.ndarray:
    factors = _working_factors(spacing, working_spacing_mm)
    if factors != (1, 1, 1):
        coarse = _block_mean(hu, factors, cancel)
        coarse_spacing = (spacing[0] * factors[2], spacing[1] * factors[1], spacing[2] * factors[0])
        small = _segment(coarse, coarse_spacing, s, progress, cancel, source)
        del coarse
        return _upsample_mask(small, hu.shape, factors, cancel)
    return _segment(hu, spacing, s, progress, cancel, source)


# ----------------------------------------------------------------------------------------------
def _segment(hu, spacing, s: LungMaskSettings, progress, cancel, source) -> np.ndarray:
    nz = hu.shape[0]
    # Units of progress: threshold+label (nz), component statistics (nz), per-slice morphology (nz).
    total = 3 * nz
    sx, sy, sz = spacing
    voxel_ml = sx * sy * sz / 1000.0
    name = source or "the scan"

    coarse, (fz, fy, fx) = _body_grid(hu, spacing, cancel)
    body = _body_coarse(coarse, (sy * fy, sx * fx), cancel)
    del coarse
    mask = np.empty(hu.shape, dtype=bool)
    for z in range(nz):
        np.less(hu[z], s.threshold_hu, out=mask[z])
        mask[z] &= _body_slice_up(body[z // fz], hu.shape[1:], fy, fx)
    del body
    cancel.raise_if_cancelled()
    labels, n = _label(mask)
    progress(STAGE, nz, total)
    if n == 0:
        raise InputError(f"no lungs found in {name}: nothing is below {s.threshold_hu:g} HU; is this a chest CT in HU?")

    count = np.zeros(n + 1, dtype=np.int64)
    core = np.zeros(n + 1, dtype=np.int64)
    core_dark = np.zeros(n + 1, dtype=np.int64)
    for z in range(nz):
        lab = labels[z]
        count += np.bincount(lab.ravel(), minlength=n + 1)
        # Interior = 2 pixels in from the edge, where partial volume no longer lifts gas above -950.
        inner = _erode_cross(_erode_cross(mask[z]))
        core += np.bincount(lab[inner], minlength=n + 1)
        core_dark += np.bincount(lab[inner & (hu[z] < s.airway_hu)], minlength=n + 1)
        if z % 16 == 15:
            cancel.raise_if_cancelled()
            progress(STAGE, nz + z + 1, total)
    keep = _lung_components(count, core, core_dark, voxel_ml, s.min_component_ml)
    if not keep.any():
        raise InputError(f"no lungs found in {name}: is this a chest CT? no aerated lung of at least "
                         f"{s.min_component_ml:g} mL below {s.threshold_hu:g} HU (only body, bowel gas or outside air)")
    for z in range(nz):
        mask[z] = keep[labels[z]]
    del labels
    progress(STAGE, 2 * nz, total)
    cancel.raise_if_cancelled()

    airway = _airways(mask, hu, spacing, s, cancel)
    if airway is not None:
        mask &= ~airway

    _per_slice(mask, hu, spacing, s, progress, cancel, done=2 * nz, total=total, airway=airway)
    del airway

    # Pieces cut off by airway removal or opening (bronchial wall rings) are not lung.
    labels, n = _label(mask)
    if n > 1:
        count = np.zeros(n + 1, dtype=np.int64)
        for z in range(nz):
            count += np.bincount(labels[z].ravel(), minlength=n + 1)
        count[0] = 0
        vol = count * voxel_ml
        keep = (vol >= min(s.min_component_ml, 0.5 * vol.max())) & (vol >= RELATIVE_MIN_FRACTION * vol.max())
        keep[0] = False
        for z in range(nz):
            mask[z] = keep[labels[z]]
    del labels
    if not mask.any():
        raise InputError(f"no lungs found in {name}: is this a chest CT? the lung region vanished after "
                         f"morphology; check the scan's spacing")
    progress(STAGE, total, total)
    return mask


def _columns_run_front_to_back(direction) -> bool:
    """Whether the array's x index axis lies closer to the patient's A-P axis than to L-R."""
    d = np.asarray(direction, dtype=np.float64).ravel()
    if d.size != 9 or not np.all(np.isfinite(d)):
        raise InputError(f"direction has {d.size} values: give the 9 direction cosines (row-major 3x3)")
    x_axis = d.reshape(3, 3)[:, 0]  # column 0: where the x index points in LPS
    return abs(x_axis[1]) > abs(x_axis[0])


# ----------------------------------------------------------------------------------------------
# Body
# ----------------------------------------------------------------------------------------------
def _body_grid(hu, spacing, cancel):
    """HU on the body's working grid; (coarse, (fz, fy, fx)).

    In-plane block means; along z the middle slice of each block of ``fz`` (thin slices only: a
    sparse series keeps every slice), since the body changes little over ``BODY_WORKING_MM``.
    """
    sx, sy, sz = spacing
    fz, fy, fx = (max(1, int(np.floor(BODY_WORKING_MM / d + 1e-6))) for d in (sz, sy, sx))
    nz, ny, nx = hu.shape
    oz, oy, ox = -(-nz // fz), -(-ny // fy), -(-nx // fx)
    out = np.empty((oz, oy, ox), dtype=np.float32)
    for k in range(oz):
        z = min(k * fz + fz // 2, nz - 1)
        sl = hu[z].astype(np.float32)
        # Padding is air. Noise below -1000 is kept: clipping it would lift the mean of noisy
        # (low-dose) air towards the lung's density.
        sl[sl <= -1500] = -1000.0
        if fy > 1 or fx > 1:
            sl = np.pad(sl, ((0, oy * fy - ny), (0, ox * fx - nx)), mode="edge")
            # Two contiguous sums: ~4x faster than one mean over the strided block axes.
            sl = sl.reshape(oy, fy, ox * fx).sum(axis=1).reshape(oy, ox, fx).sum(axis=2) / (fy * fx)
        out[k] = sl
        if k % 32 == 31:
            cancel.raise_if_cancelled()
    return out, (fz, fy, fx)


def _body_coarse(coarse, samp, cancel) -> np.ndarray:
    """The filled body on the working grid (see step 0 of the module docstring)."""
    nz = coarse.shape[0]
    soft = coarse > BODY_HU
    for z in range(nz):
        if soft[z].any():
            soft[z] = _open(soft[z], BODY_OPEN_MM, samp)
    labels, n = _label(soft)
    body = np.zeros(soft.shape, dtype=bool)
    if n == 0:
        return body
    count = np.zeros(n + 1, dtype=np.int64)
    for z in range(nz):
        count += np.bincount(labels[z].ravel(), minlength=n + 1)
    count[0] = 0
    patient = int(np.argmax(count))
    cut = np.zeros(soft.shape, dtype=bool)
    outside = np.zeros(soft.shape, dtype=bool)
    for z in range(nz):
        core = labels[z] == patient
        if core.any():
            body[z], cut[z], outside[z] = _fill_body(core, coarse[z])
        if z % 32 == 31:
            cancel.raise_if_cancelled()
    del labels
    if cut.any():
        # A region that looks like lung cut by the crop in one slice but joins air outside the
        # body in another (a mattress pressed between the body and the image edge) is outside.
        joined, _ = _label(cut | outside)
        bad = np.unique(joined[outside])
        cut &= ~np.isin(joined, bad[bad > 0])
        body |= cut
    return body


def _fill_body(core, hu2):
    """One slice: (body with its enclosed regions, regions that look like lung cut by the crop,
    regions reaching the edge that are outside)."""
    labels, n = ndi.label(~core)
    if n == 0:
        return core, np.zeros_like(core), np.zeros_like(core)
    edge = np.zeros(n + 1, dtype=bool)
    edge[labels[0]] = edge[labels[-1]] = edge[labels[:, 0]] = edge[labels[:, -1]] = True
    edge[0] = False
    cut = np.zeros(n + 1, dtype=bool)
    for i in np.flatnonzero(edge):
        region = labels == i
        if np.median(hu2[region]) <= OUTSIDE_AIR_HU:
            continue
        rim = ndi.binary_dilation(region) & ~region
        if rim.any() and np.count_nonzero(rim & core) >= CROP_WALL_FRACTION * np.count_nonzero(rim):
            cut[i] = True
    return ~edge[labels], cut[labels], (edge & ~cut)[labels]


def _body_slice_up(small2, shape2, fy, fx) -> np.ndarray:
    """Nearest-neighbour copy of one working-grid slice back to the scan's pixels."""
    if fy == 1 and fx == 1:
        return small2
    return np.repeat(np.repeat(small2, fy, axis=0), fx, axis=1)[:shape2[0], :shape2[1]]


def _label(mask: np.ndarray):
    """6-connected labels; int16 when the count allows (half the memory of int32)."""
    try:
        return ndi.label(mask, output=np.int16)
    except RuntimeError:
        return ndi.label(mask, output=np.int32)


def _erode_cross(m: np.ndarray) -> np.ndarray:
    """One binary erosion with the 4-neighbour cross, outside the slice counting as background.

    The same as ``ndi.binary_erosion(m)`` with its defaults, as five array ANDs (~10x faster on a
    512x512 slice, which matters when every slice of the scan is eroded).
    """
    out = m.copy()
    out[1:] &= m[:-1]
    out[:-1] &= m[1:]
    out[:, 1:] &= m[:, :-1]
    out[:, :-1] &= m[:, 1:]
    out[0] = out[-1] = False
    out[:, 0] = out[:, -1] = False
    return out


def _lung_components(count, core, core_dark, voxel_ml, min_component_ml) -> np.ndarray:
    """Boolean per label: aerated lung rather than gas, large enough."""
    vol = count * voxel_ml
    with np.errstate(invalid="ignore", divide="ignore"):
        dark = np.where(core > 0, core_dark / np.maximum(core, 1), 0.0)
    # A thin component has no interior: judge it by its whole body then (not needed for big lungs).
    gas = dark >= GAS_CORE_FRACTION
    mixed_gas = (dark >= MIXED_GAS_CORE_FRACTION) & (vol < MIXED_GAS_MAX_ML)
    keep = (vol >= min_component_ml) & ~gas & ~mixed_gas
    keep[0] = False
    if keep.any():
        keep &= vol >= RELATIVE_MIN_FRACTION * vol[keep].max()
    return keep


# ----------------------------------------------------------------------------------------------
# Airways
# ----------------------------------------------------------------------------------------------
def _airways(mask, hu, spacing, s: LungMaskSettings, cancel) -> Optional[np.ndarray]:
    """Trachea + bronchi lumen (bool, full shape) found from the ends of the lung region, or None."""
    sx, sy, sz = spacing
    zs = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    if zs.size == 0:
        return None
    xs = np.flatnonzero(mask.any(axis=(0, 1)))
    x_lo, x_hi = xs[0], xs[-1]
    n_search = max(1, int(round(TRACHEA_SEARCH_MM / sz)))
    seeds = np.zeros(mask.shape, dtype=bool)
    found = False
    for ends in (range(zs[0], min(zs[0] + n_search, zs[-1] + 1)),
                 range(zs[-1], max(zs[-1] - n_search, zs[0] - 1), -1)):
        for z in ends:
            comps = _trachea_sections(mask[z], hu[z], sx, sy, x_lo, x_hi, s.airway_hu)
            if comps is not None:
                seeds[z] |= comps
                found = True
    if not found:
        return None
    cancel.raise_if_cancelled()
    z0, z1 = zs[0], zs[-1] + 1
    sub_mask = mask[z0:z1]
    sub_hu = hu[z0:z1]
    sub_seeds = seeds[z0:z1]
    voxel_ml = sx * sy * sz / 1000.0
    airway = None
    # Loosest first (partial volume at coarse spacing darkens less than -950 HU); a leak into the
    # parenchyma shows as a tree above MAX_AIRWAY_ML and falls back to a stricter threshold.
    for thr in (s.airway_hu + TRACHEA_DARK_MARGIN_HU, s.airway_hu, s.airway_hu - 25.0, s.airway_hu - 50.0):
        lumen = sub_mask & (sub_hu < thr)
        labels, _ = _label(lumen)
        ids = np.unique(labels[sub_seeds & lumen])
        ids = ids[ids > 0]
        if ids.size == 0:
            continue
        tree = np.isin(labels, ids)
        del labels, lumen
        if np.count_nonzero(tree) * voxel_ml <= MAX_AIRWAY_ML:
            airway = tree
            break
        cancel.raise_if_cancelled()
    if airway is None:
        # Leaks at every threshold (emphysema, honeycombing): remove only the trachea sections found.
        airway = sub_seeds.copy()
    out = np.zeros(mask.shape, dtype=bool)
    # At least one pixel: the partial-volume ring around the lumen is a pixel wide at any spacing.
    wall = max(AIRWAY_WALL_MM, max(sx, sy) * 1.01)
    for i in range(airway.shape[0]):
        if airway[i].any():
            grown = _distance_mm(~airway[i], (sy, sx)) <= wall
            out[z0 + i] = grown & mask[z0 + i]
    return out


def _trachea_sections(m2, hu2, sx, sy, x_lo, x_hi, airway_hu) -> Optional[np.ndarray]:
    """2-D components of one slice's lung region that look like a trachea cross-section."""
    labels, n = ndi.label(m2)
    if n == 0:
        return None
    area_px = np.bincount(labels.ravel(), minlength=n + 1)
    # A margin over airway_hu: at 2+ mm pixels much of a trachea section is partial volume.
    dark_px = np.bincount(labels[hu2 < airway_hu + TRACHEA_DARK_MARGIN_HU], minlength=n + 1)
    pix_mm2 = sx * sy
    lo, hi = TRACHEA_AREA_MM2
    out = None
    width = max(x_hi - x_lo, 1)
    for i in np.flatnonzero((area_px * pix_mm2 >= lo) & (area_px * pix_mm2 <= hi)):
        if i == 0 or dark_px[i] < 0.5 * area_px[i]:
            continue
        ys, xs = np.nonzero(labels == i)
        cx = (xs.mean() - x_lo) / width
        if not 0.25 <= cx <= 0.75:
            continue
        h = (ys.max() - ys.min() + 1) * sy
        w = (xs.max() - xs.min() + 1) * sx
        if max(h, w) > 2.5 * min(h, w):
            continue
        # Round: fills most of its bounding ellipse.
        if area_px[i] * pix_mm2 < 0.5 * np.pi * h * w / 4.0:
            continue
        out = (labels == i) if out is None else (out | (labels == i))
    return out


# ----------------------------------------------------------------------------------------------
# Per-slice morphology
# ----------------------------------------------------------------------------------------------
def _per_slice(mask, hu, spacing, s: LungMaskSettings, progress, cancel, *, done, total, airway=None) -> None:
    sx, sy, _ = spacing
    samp = (sy, sx)
    max_hole_px = MAX_HOLE_CM2 * 100.0 / (sx * sy)
    small_hole_px = SMALL_HOLE_CM2 * 100.0 / (sx * sy)
    # The midline between the lungs: the column that splits the lung voxels in half.
    cols = np.zeros(mask.shape[2], dtype=np.int64)
    for z in range(mask.shape[0]):
        cols += np.count_nonzero(mask[z], axis=0)
    mid_col = int(np.searchsorted(np.cumsum(cols), cols.sum() / 2.0))
    nz = mask.shape[0]
    # Every step below moves the lung edge outward by at most its radius, and the distance
    # transforms never look farther, so each side is cut to its bounding box plus that reach
    # (and a background ring): the same result as on the whole slice, at ~60 % of the pixels.
    side_margin_px = int(np.ceil(max(s.closing_mm, RIM_MM, DENSE_GROW_MM, RIM_WINDOW_MM) / min(samp))) + 3
    final_margin_px = int(np.ceil(max(s.opening_mm, s.erosion_mm) / min(samp))) + 3

    def one_slice(z: int) -> None:
        m = mask[z]
        if not m.any():
            return
        # Each side on its own: done on both lungs together, the closings bridge the narrow
        # mediastinum at the junction lines and the mediastinum becomes a "hole" to fill.
        out = np.zeros_like(m)
        for side, pad in ((slice(0, mid_col), (0, 1)), (slice(mid_col, m.shape[1]), (1, 0))):
            if not m[:, side].any():
                continue
            # One background column on the cut side: the morphology treats the image edge as
            # lung (for crops through the lungs), which must not happen at the midline cut.
            part = np.pad(m[:, side], ((0, 0), pad))
            hu_part = np.pad(hu[z][:, side], ((0, 0), pad), constant_values=0)
            airway_part = np.pad(airway[z][:, side], ((0, 0), pad)) if airway is not None else None
            part = _in_box(part, side_margin_px, lambda p, h, a: _side_morphology(
                p, h, a, s, samp, small_hole_px, max_hole_px), hu_part, airway_part)
            out[:, side] = part[:, pad[0]:part.shape[1] - pad[1]]
        m = out
        if s.opening_mm > 0:
            m = _in_box(m, final_margin_px, lambda p: _open(p, s.opening_mm, samp))
        if s.erosion_mm > 0:
            m = _in_box(m, final_margin_px, lambda p: _distance_mm(p, samp) > s.erosion_mm)
        mask[z] = m

    # The slices are independent (each writes only its own mask[z]), so a thread pool runs them side
    # by side where scipy.ndimage and numpy release the GIL; edt's 2-D transform holds it, which
    # caps the gain at ~1.1x on 2 cores (the reference phantom's lung mask: 11.0 -> 10.0 s).
    step = 8
    with ThreadPoolExecutor(max_workers=worker_threads()) as pool:
        for start in range(0, nz, step):
            stop = min(start + step, nz)
            list(pool.map(one_slice, range(start, stop)))
            cancel.raise_if_cancelled()
            progress(STAGE, done + stop, total)


def worker_threads() -> int:
    """Threads for the per-slice work: the CPUs this process may use, or fewer where OMP_NUM_THREADS says so."""
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        available = os.cpu_count() or 1
    limit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if limit.isdigit() and int(limit) > 0:
        available = min(available, int(limit))
    return max(1, min(available, MAX_WORKER_THREADS))


def _side_morphology(part, hu_part, airway_part, s: LungMaskSettings, samp, small_hole_px, max_hole_px):
    """Closing, dense rim and hole filling of one lung side of one slice."""
    if s.closing_mm > 0:
        part = _close(part, s.closing_mm, samp)
    part = _rim(part, hu_part, samp)
    if s.fill_holes:
        part = _fill_holes(part, hu_part, small_hole_px, max_hole_px)
    if airway_part is not None and airway_part.any():
        # The closings pull the removed trachea and main bronchi back in: take them out
        # again, but keep bronchi inside the lung (enclosed, small), which are lung.
        part = _fill_holes(part & ~airway_part, hu_part, small_hole_px, 0)
    return part


def _in_box(m, margin_px: int, fn, *arrays):
    """``fn(m, *arrays)`` on the bounding box of ``m`` grown by ``margin_px``; False outside it.

    Equal to ``fn`` on the whole slice when ``fn`` grows ``m`` by less than the margin: a box side
    away from the image edge then ends in background, so distances to background inside the box
    are the true ones (the nearest outside point, clamped into the box, is no farther), and a box
    side on the image edge keeps that edge's meaning. ``None`` arrays pass through.
    """
    rows = np.flatnonzero(m.any(axis=1))
    cols = np.flatnonzero(m.any(axis=0))
    r0, r1 = max(rows[0] - margin_px, 0), min(rows[-1] + margin_px + 1, m.shape[0])
    c0, c1 = max(cols[0] - margin_px, 0), min(cols[-1] + margin_px + 1, m.shape[1])
    box = (slice(r0, r1), slice(c0, c1))
    out = np.zeros_like(m)
    out[box] = fn(m[box], *(a[box] if a is not None else None for a in arrays))
    return out


def _distance_mm(m, samp):
    """Euclidean distance (mm) from each True pixel to the nearest False one in the slice; 0 on False.

    Pixels beyond the image edge are not background, and a slice without any False pixel is inf
    everywhere. The ``edt`` package computes the same exact transform as scipy's
    ``distance_transform_edt`` (to float32 rounding) about 3-5x faster, which matters because the
    per-slice morphology runs it ~10 times per slice (most of the lung mask's time with scipy).
    """
    return edt.edt(np.ascontiguousarray(m), anisotropy=tuple(float(d) for d in samp), black_border=False, parallel=1)


def _dilate(m, r_mm, samp):
    return _distance_mm(~m, samp) <= r_mm


def _erode(m, r_mm, samp):
    # Pixels beyond the image edge count as foreground, so lungs cut by a crop are not eaten away.
    return _distance_mm(m, samp) > r_mm


def _close(m, r_mm, samp):
    if m.all():
        return m
    return _erode(_dilate(m, r_mm, samp), r_mm, samp) | m


def _open(m, r_mm, samp):
    return _dilate(_erode(m, r_mm, samp), r_mm, samp) & m


def _rim(m, hu2, samp):
    """Add the dense lung next to the aerated lung that the threshold misses.

    Only tissue in the lung-tissue HU range (``RIM_HU``) whose neighbourhood averages like lung
    (``RIM_MEAN_HU``) is taken, so chest wall, mediastinal fat, heart and liver stay out. It comes
    in two ways: within a wide closing (``RIM_MM``) of the aerated lung, the dense walls between
    the aerated islands of a fibrotic periphery; and connected to the aerated lung through such
    tissue up to ``DENSE_GROW_MM`` away, a band of dense ground glass against the pleura of the
    lung bases with no aerated lung in it at all.
    """
    lo, hi = RIM_HU
    candidate = (hu2 >= lo) & (hu2 <= hi) & ~m
    if not candidate.any():
        return m
    size = [max(1, int(round(RIM_WINDOW_MM / d))) | 1 for d in samp]
    mean = ndi.uniform_filter(hu2.astype(np.float32), size=size, mode="nearest")
    candidate &= (mean >= RIM_MEAN_HU[0]) & (mean <= RIM_MEAN_HU[1])
    if not candidate.any():
        return m
    # One distance from the aerated lung serves both the wide closing's dilation and the growth
    # limit (the distance transforms are most of the lung mask's time).
    outside_mm = _distance_mm(~m, samp)
    closed = _erode(outside_mm <= RIM_MM, RIM_MM, samp) | m
    # Ground glass itself (not solid tissue) is followed, so the growth never runs along the
    # partial-volume edge of chest wall, heart or liver.
    grow = candidate & (hu2 <= GROUND_GLASS_MAX_HU) & (outside_mm <= DENSE_GROW_MM)
    labels, _ = ndi.label(grow | m)
    reached = np.unique(labels[m])
    connected = grow & np.isin(labels, reached[reached > 0])
    return m | (closed & candidate) | connected


def _fill_holes(m, hu2, small_hole_px, max_hole_px):
    """Fill holes that are lung: vessels and nodules (small), or enclosed dense lung (not organ).

    A large hole of solid soft tissue (median above ``ORGAN_HU``) is the top of the liver or
    heart cut by the slice where the diaphragm domes up into the lung base, not lung.
    """
    # The holes are the background's 4-connected pieces that do not touch the slice edge (what
    # ndi.binary_fill_holes fills): one labelling finds and numbers them, ~3x faster than its
    # iterated dilation followed by a second labelling.
    labels, n = ndi.label(~m)
    if n == 0:
        return m
    outside = np.zeros(n + 1, dtype=bool)
    outside[labels[0]] = outside[labels[-1]] = outside[labels[:, 0]] = outside[labels[:, -1]] = True
    outside[0] = True  # label 0 is the lung itself
    area = np.bincount(labels.ravel(), minlength=n + 1)
    ok = (area <= small_hole_px) & ~outside
    for i in np.flatnonzero(~ok & ~outside & (area <= max_hole_px)):
        if np.median(hu2[labels == i]) < ORGAN_HU:
            ok[i] = True
    return m | ok[labels]


# ----------------------------------------------------------------------------------------------
# Coarse working grid
# ----------------------------------------------------------------------------------------------
def _working_factors(spacing, working_spacing_mm) -> tuple:
    """Integer block sizes (z, y, x) that bring each axis to about ``working_spacing_mm``."""
    if working_spacing_mm is None:
        return (1, 1, 1)
    if not working_spacing_mm > 0:
        raise InputError(f"working spacing {working_spacing_mm} mm must be positive")
    sx, sy, sz = spacing
    return tuple(max(1, int(np.floor(working_spacing_mm / v + 1e-6))) for v in (sz, sy, sx))


def _block_mean(hu, factors, cancel) -> np.ndarray:
    fz, fy, fx = factors
    nz, ny, nx = hu.shape
    oz, oy, ox = -(-nz // fz), -(-ny // fy), -(-nx // fx)
    out = np.empty((oz, oy, ox), dtype=np.int16)
    for k in range(oz):
        block = hu[k * fz:(k + 1) * fz].astype(np.float32)
        # Padding enters the mean as air, not as -3024.
        np.maximum(block, -1000.0, out=block)
        pad_y, pad_x = oy * fy - ny, ox * fx - nx
        if pad_y or pad_x:
            block = np.pad(block, ((0, 0), (0, pad_y), (0, pad_x)), mode="edge")
        out[k] = np.rint(block.reshape(block.shape[0], oy, fy, ox, fx).mean(axis=(0, 2, 4)))
        if k % 16 == 15:
            cancel.raise_if_cancelled()
    return out


def _upsample_mask(small, shape, factors, cancel) -> np.ndarray:
    """Linear interpolation of the coarse mask at the fine voxel centres, threshold 0.5."""
    fz, fy, fx = factors
    nz, ny, nx = shape

    def coords(n, f, m):
        # Fine voxel i lies at coarse coordinate (i + 0.5) / f - 0.5.
        c = (np.arange(n) + 0.5) / f - 0.5
        return np.clip(c, 0, m - 1)

    cy = coords(ny, fy, small.shape[1])
    cx = coords(nx, fx, small.shape[2])
    cz = coords(nz, fz, small.shape[0])
    out = np.empty(shape, dtype=bool)
    yy0 = np.floor(cy).astype(int)
    yy1 = np.minimum(yy0 + 1, small.shape[1] - 1)
    wy = (cy - yy0).astype(np.float32)[:, None]
    xx0 = np.floor(cx).astype(int)
    xx1 = np.minimum(xx0 + 1, small.shape[2] - 1)
    wx = (cx - xx0).astype(np.float32)[None, :]
    for z in range(nz):
        z0 = int(np.floor(cz[z]))
        z1 = min(z0 + 1, small.shape[0] - 1)
        wz = np.float32(cz[z] - z0)
        sl = small[z0].astype(np.float32) * (1 - wz) + small[z1].astype(np.float32) * wz
        rows = sl[yy0] * (1 - wy) + sl[yy1] * wy
        val = rows[:, xx0] * (1 - wx) + rows[:, xx1] * wx
        out[z] = val >= 0.5
        if z % 32 == 31:
            cancel.raise_if_cancelled()
    return out
