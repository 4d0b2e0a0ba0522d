"""How much of the lung, and where: extent of a prompted finding, overall and by zone.

Step after scoring (probabilities -> extent). Pure functions on arrays and geometry:

1. ``lung_zones``: every lung voxel gets a zone code: side (patient left/right, from RAS, not the
   array's x), cranio-caudal third of *its own* lung's extent along the patient S axis, and whether
   it lies in the subpleural rind (distance to the pleural surface <= ``rind_mm``, a Euclidean
   distance transform inside the lung mask with the true voxel spacing). Patient coordinates come
   from the scan's direction cosines, so a flipped or feet-first scan gets the same zones.
2. ``zone_volume_table``: for every candidate patch, the lung volume (mL) per zone code that the
   patch stands for (its box, through the slab of slices it represents; each slice counted over its
   own slab, so interval series are measured at their true slice positions). Computed once per scan;
   extent for any prompt is then a sum over the positive rows (re-prompting stays cheap).
3. ``positive_patches``: the rule that turns uncalibrated zero-shot scores into positive patches
   (see ``RULE``), and ``extent_summary``: fractions per zone and the predominance line.

Why the rule is relative to the scan. CheXzero-style probabilities are a softmax of raw cosine
similarities: they sit near 0.5, and both their offset (text-embedding bias between "X" and "no X")
and their spread differ between models and prompts, so no fixed cut (0.5 or otherwise) means the
same thing twice. What the zero-shot model does reliably is *rank* patches within a scan (the whole
montage method rests on it). So each patch's margin ``logit(p) = s_pos - s_neg`` is compared with
the scan's own lung: centre = the median margin, spread = robust SD of the margins *below* the
median (the finding, when present, lies on the upper side and must not widen the reference). A
patch is positive when it stands more than ``k`` spreads above the centre. Its limit: a finding
that covers much of the scored lung moves the median into it (from about a third on, the extent is
underestimated; past half it is not seen).

Where the model ships a normal-lung reference for the prompt (``extent_calibration.json``: the
prompt's margins pooled over normal scans, in ``weights/``, written by ``bench/bench_extent.py --calibrate``), a
patch must also stand ``k`` robust SDs above that reference: a normal scan's own upper tail then
no longer counts. Without one (any other model or prompt) the rule is the per-scan reference alone,
and ``rule`` says which was used. Measured on phantoms with ground
truth in bench/RESULTS.md (bench/bench_extent.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import json
from pathlib import Path

import edt
import numpy as np
from scipy import ndimage

from .lung_mask import worker_threads
from .results import PatchSet

#: Default depth (mm) of the subpleural rind: lung within this distance of the pleural surface.
DEFAULT_RIND_MM = 10.0
#: Default number of reference spreads above the scan's median margin for a positive patch.
DEFAULT_Z = 3.0
ZONES = ("upper", "middle", "lower", "left", "right", "subpleural", "central")
THIRDS = ("lower", "middle", "upper")  # third index 0, 1, 2 (from the base up)
#: A zone share must be this many times the other side's share to count as predominant.
PREDOMINANCE_RATIO = 1.5
N_CODES = 12  # side (2) x third (3) x subpleural (2)
#: Normal-lung references per model and prompt, shipped with the package (see ``normal_reference``).
CALIBRATION_PATH = Path(__file__).resolve().parent / "weights" / "extent_calibration.json"
#: Below this share of the scored lung the zone shares are noise: predominance says "minimal".
MIN_EXTENT_FOR_PREDOMINANCE = 0.05
#: One line stating the positive rule (written with each extent in result.json).
RULE = ("positive patch: logit(p) above the median of the scan's own patches by more than {k:g} robust SDs of "
        "those below it (a per-scan normal-lung reference, since raw-cosine probabilities are uncalibrated)"
        "{calibrated}; extent = lung volume "
        "in positive boxes / scored lung volume of the zone (boxes through their slice slab; lung outside every "
        "candidate box counts neither way); zones: thirds of each lung's S extent, patient left/right, "
        "subpleural = within {rind:g} mm of the pleura (3-D distance transform, true spacing)")


def code_of(left: np.ndarray, third: np.ndarray, subpleural: np.ndarray) -> np.ndarray:
    return (left.astype(np.uint8) * 6 + third.astype(np.uint8) * 2 + subpleural.astype(np.uint8)).astype(np.uint8)


def _slice_offsets_mm(nz: int, spacing_mm, slice_positions_mm) -> np.ndarray:
    if slice_positions_mm is None:
        return np.arange(nz, dtype=np.float64) * float(spacing_mm[2])
    return np.asarray(slice_positions_mm, dtype=np.float64)


def slab_mm(nz: int, spacing_mm, slice_positions_mm=None) -> np.ndarray:
    """Thickness each slice stands for (the same rule as ``Scan.slab_mm``)."""
    from .geometry import slab_thickness_mm

    if slice_positions_mm is None:
        return np.full(nz, float(spacing_mm[2]))
    return slab_thickness_mm(slice_positions_mm)


def _rs_of(z: int, ys: np.ndarray, xs: np.ndarray, spacing_mm, origin_mm, direction, offsets_mm):
    """Patient R and S (mm) of voxels (z, ys, xs); z placed at its true offset along the slice normal.

    Only the two coordinates the zones use, each as one linear combination (RAS = LPS with the
    first two signs flipped): on a 1 mm scan this is called for ~7 million voxels three times.
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    x_mm, y_mm = xs * float(spacing_mm[0]), ys * float(spacing_mm[1])
    z_mm = float(offsets_mm[z])
    l_mm = d[0, 0] * x_mm + d[0, 1] * y_mm + (d[0, 2] * z_mm + float(origin_mm[0]))
    s_mm = d[2, 0] * x_mm + d[2, 1] * y_mm + (d[2, 2] * z_mm + float(origin_mm[2]))
    return -l_mm, s_mm


def subpleural_rind(lung_mask: np.ndarray, spacing_mm, rind_mm: float = DEFAULT_RIND_MM,
                    slice_positions_mm=None) -> np.ndarray:
    """Bool [z,y,x]: lung voxels within ``rind_mm`` of the pleural surface (the mask's boundary).

    Evenly spaced scans: exact 3-D Euclidean distance transform with the true (x, y, z) spacing, on
    the lungs' bounding box plus one voxel (the scan's own edge is not pleura: a lung cut off by the
    field of view gets no rind there). Interval series (slices 1 mm then 9 mm apart): the same
    Euclidean distance over the sampled slices at their true positions (``_interval_depth``); the
    lung between two sampled slices is not seen, so a pleural surface there counts from the nearest
    sampled slice.
    """
    mask = np.asarray(lung_mask, dtype=bool)
    out = np.zeros(mask.shape, dtype=bool)
    if not mask.any():
        return out
    sx, sy, sz = (float(v) for v in spacing_mm)
    bounds = []
    for axis in range(3):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        bounds.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, mask.shape[axis])))
    crop = mask[tuple(bounds)]
    if slice_positions_mm is None:
        # The ``edt`` package (already used by the lung mask): the same exact transform as scipy's,
        # in float32 and without scipy's (3, z, y, x) index array, ~0.7 GB less peak on a 1 mm scan;
        # its own threads on every core this process may use (1.27 s -> ~0.95 s on the reference, 2 cores).
        depth = edt.edt(np.ascontiguousarray(crop), anisotropy=(sz, sy, sx), black_border=False,
                        parallel=worker_threads())
    else:
        depth = _interval_depth(crop, (sx, sy), np.asarray(slice_positions_mm, dtype=np.float64)[bounds[0]], rind_mm)
    out[tuple(bounds)] = crop & (depth <= rind_mm)
    return out


def _interval_depth(crop: np.ndarray, spacing_xy, positions: np.ndarray, rind_mm: float) -> np.ndarray:
    """Distance (mm) from each voxel to the nearest non-lung sample, slices at their true ``positions``.

    Exact for the sampled points: the squared distance to a non-lung point of slice z' is dz^2 plus the
    squared in-plane distance to that slice's nearest non-lung pixel (its 2-D distance transform), so
    the depth is the minimum of that over the slices within ``rind_mm`` (farther ones cannot be nearer
    than the rind). Depths beyond the rind come out as inf.
    """
    sx, sy = spacing_xy
    inplane = np.stack([ndimage.distance_transform_edt(sl, sampling=(sy, sx)) if sl.any() else np.zeros(sl.shape)
                        for sl in crop])
    depth = np.full(crop.shape, np.inf)
    for z in range(crop.shape[0]):
        near = np.flatnonzero(np.abs(positions - positions[z]) <= rind_mm)
        for k in near:
            dz = positions[k] - positions[z]
            np.minimum(depth[z], np.sqrt(dz * dz + inplane[k] ** 2), out=depth[z])
    return depth


@dataclass
class LungZones:
    """Zone code per lung voxel (uint8 [z,y,x], 255 outside the lungs) and how the zones were drawn."""

    codes: np.ndarray
    midline_r_mm: float
    s_range_mm: dict  # {"left": (lo, hi), "right": (lo, hi)} patient S extent of each lung
    rind_mm: float

    OUTSIDE = 255


def lung_zones(lung_mask: np.ndarray, spacing_mm, origin_mm=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
               slice_positions_mm=None, rind_mm: float = DEFAULT_RIND_MM) -> LungZones:
    """Zone code of every lung voxel (see ``code_of``): side, third of its lung's S extent, subpleural.

    Left/right: the patient R coordinate against the midline halfway between the lungs' outermost
    points. Thirds: each lung's own span along S (apex to base), cut in three equal heights.
    """
    mask = np.asarray(lung_mask, dtype=bool)
    nz = mask.shape[0]
    codes = np.full(mask.shape, LungZones.OUTSIDE, dtype=np.uint8)
    offsets = _slice_offsets_mm(nz, spacing_mm, slice_positions_mm)
    geo = (spacing_mm, origin_mm, direction, offsets)
    # Each lung slice's voxel positions, found once (int16: ~4 bytes a voxel) for the three passes.
    voxels = {}
    for z in range(nz):
        ys, xs = np.nonzero(mask[z])
        if ys.size:
            voxels[z] = (ys.astype(np.int16), xs.astype(np.int16)) if max(mask.shape[1:]) < 2 ** 15 else (ys, xs)
    if not voxels:
        return LungZones(codes, 0.0, {}, float(rind_mm))
    r_lo, r_hi = np.inf, -np.inf
    for z, (ys, xs) in voxels.items():
        r = _rs_of(z, ys, xs, *geo)[0]
        r_lo, r_hi = min(r_lo, float(r.min())), max(r_hi, float(r.max()))
    midline = (r_lo + r_hi) / 2.0
    s_lo, s_hi = [np.inf, np.inf], [-np.inf, -np.inf]  # index 0 right lung, 1 left lung
    for z, (ys, xs) in voxels.items():
        r, s_mm = _rs_of(z, ys, xs, *geo)
        left = r < midline  # RAS: +R is the patient's right
        for side in (0, 1):
            sel = left == bool(side)
            if sel.any():
                s_lo[side] = min(s_lo[side], float(s_mm[sel].min()))
                s_hi[side] = max(s_hi[side], float(s_mm[sel].max()))
    rind = subpleural_rind(mask, spacing_mm, rind_mm, slice_positions_mm)
    for z, (ys, xs) in voxels.items():
        r, s_mm = _rs_of(z, ys, xs, *geo)
        left = r < midline
        lo = np.where(left, s_lo[1], s_lo[0])
        hi = np.where(left, s_hi[1], s_hi[0])
        height = np.maximum(hi - lo, 1e-9)
        third = np.clip(np.floor(3.0 * (s_mm - lo) / height), 0, 2)
        codes[z, ys, xs] = code_of(left, third, rind[z, ys, xs])
    ranges = {name: (s_lo[i], s_hi[i]) for i, name in ((0, "right"), (1, "left")) if np.isfinite(s_lo[i])}
    return LungZones(codes, float(midline), ranges, float(rind_mm))


def zone_volume_table(codes: np.ndarray, patches: PatchSet, spacing_mm, slab_voxels: int = 1,
                      slice_slab_mm: Optional[np.ndarray] = None) -> np.ndarray:
    """(N + 1, N_CODES) lung volume in mL per patch and zone code; the last row is lung in no box.

    Each patch stands for its box through ``slab_voxels`` slices centred on its own slice (the slice
    step, as the heatmap paints it). Where boxes overlap (stride < 1) a voxel counts once, for the
    box later in candidate order. Each slice is weighted by ``slice_slab_mm`` (its own slab for an
    interval series; default the z spacing).
    """
    nz = codes.shape[0]
    n = len(patches)
    if slice_slab_mm is None:
        slice_slab_mm = np.full(nz, float(spacing_mm[2]))
    area_mm2 = float(spacing_mm[0]) * float(spacing_mm[1])
    half_lo, half_hi = (slab_voxels - 1) // 2, slab_voxels // 2
    table = np.zeros((n + 1) * N_CODES, dtype=np.float64)
    z0 = np.maximum(patches.slice_index - half_lo, 0)
    z1 = np.minimum(patches.slice_index + half_hi + 1, nz)
    owner = np.empty(codes.shape[1:], dtype=np.int64)
    for z in range(nz):
        lung = codes[z] != LungZones.OUTSIDE
        if not lung.any():
            continue
        owner.fill(n)
        for i in np.flatnonzero((z0 <= z) & (z < z1)):
            r, c = int(patches.row0[i]), int(patches.col0[i])
            owner[r:r + patches.size_rows, c:c + patches.size_cols] = i
        keys = owner[lung] * N_CODES + codes[z][lung]
        table += np.bincount(keys, minlength=table.size) * (area_mm2 * float(slice_slab_mm[z]) / 1000.0)
    return table.reshape(n + 1, N_CODES)


# ----------------------------------------------------------------------------------------------
# The positive rule
# ----------------------------------------------------------------------------------------------
def reference_z(scores: np.ndarray) -> np.ndarray:
    """Scores standardised against the scan's own lung: (s - median) / robust SD of the scores below the median.

    The median, not a mode: patch scores of a normal lung are often bimodal (dense dependent or
    chest-wall boxes form a second cluster), and a mode estimate (tried: the shorth) then lands on
    the lower cluster and calls the upper one positive (normal-lung extent up to 40 % on phantoms).
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return s.copy()
    centre = float(np.median(s))
    lower = centre - s[s <= centre]
    spread = 1.4826 * float(np.median(lower)) if lower.size else 0.0
    if not spread > 0:  # every patch scored alike: spread from the whole set, else nothing stands out
        spread = 1.4826 * float(np.median(np.abs(s - centre)))
    if not spread > 0:
        return np.zeros_like(s)
    return (s - centre) / spread


def margins(probabilities: np.ndarray) -> np.ndarray:
    """logit(p): the prompt-vs-negative cosine contrast behind a CheXzero probability."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def positive_patches(probabilities: np.ndarray, z: float = DEFAULT_Z, reference: Optional[dict] = None) -> np.ndarray:
    """(N,) bool: patches whose margin stands more than ``z`` spreads above the scan's median (and, with a
    ``reference`` {"centre", "spread"} of normal lungs for this model and prompt, above that too)."""
    m = margins(probabilities)
    positive = reference_z(m) > z
    if reference is not None:
        positive &= (m - float(reference["centre"])) / float(reference["spread"]) > z
    return positive


def normal_reference(model_name: str, prompt: str, path=None) -> Optional[dict]:
    """The normal-lung margin reference shipped for (model, prompt), or None (then the per-scan rule alone)."""
    path = Path(path) if path is not None else CALIBRATION_PATH
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ref = (table.get("models", {}).get(model_name) or {}).get(prompt.strip())
    if not ref or not float(ref.get("spread", 0)) > 0:
        return None
    return ref


def calibrate(normal_probabilities: Sequence[np.ndarray]) -> dict:
    """A normal-lung reference from normal scans' patch probabilities: pooled median and robust SD of the margin."""
    m = np.concatenate([margins(p) for p in normal_probabilities])
    centre = float(np.median(m))
    return {"centre": centre, "spread": 1.4826 * float(np.median(np.abs(m - centre))),
            "scans": len(normal_probabilities), "patches": int(m.size)}


# ----------------------------------------------------------------------------------------------
# Fractions and predominance
# ----------------------------------------------------------------------------------------------
def _zone_masks() -> dict:
    code = np.arange(N_CODES)
    left, third, sub = code // 6, (code % 6) // 2, code % 2
    return {"upper": third == 2, "middle": third == 1, "lower": third == 0, "left": left == 1,
            "right": left == 0, "subpleural": sub == 1, "central": sub == 0}


def zone_fractions(table: np.ndarray, positive: np.ndarray) -> tuple[float, dict, dict]:
    """(lung fraction, {zone: fraction}, {zone: scored mL}) of the scored lung that ``positive`` rows cover."""
    scored = table[:-1]
    pos = scored[np.asarray(positive, dtype=bool)].sum(axis=0)
    total = scored.sum(axis=0)
    fractions, volumes = {}, {}
    for name, sel in _zone_masks().items():
        t = float(total[sel].sum())
        fractions[name] = float(pos[sel].sum()) / t if t > 0 else float("nan")
        volumes[name] = t
    whole = float(total.sum())
    return (float(pos.sum()) / whole if whole > 0 else float("nan")), fractions, volumes


def predominance(by_zone: dict, ratio: float = PREDOMINANCE_RATIO, lung_fraction: Optional[float] = None) -> str:
    """"lower, subpleural"-style summary: the zone whose share is ``ratio`` x its counterpart's.

    Cranio-caudal: the largest third if it is ``ratio`` x the largest of the other two; axial:
    subpleural vs central; side: left vs right. "diffuse" when none stands out, "none" when nothing
    is positive, "minimal" when ``lung_fraction`` is under ``MIN_EXTENT_FOR_PREDOMINANCE`` (a few
    stray boxes, as on normal lungs, have no distribution to speak of).
    """
    def val(k):
        v = by_zone.get(k)
        return 0.0 if v is None or not np.isfinite(v) else float(v)

    if max(val(k) for k in ZONES) <= 0:
        return "none"
    if lung_fraction is not None and np.isfinite(lung_fraction) and lung_fraction < MIN_EXTENT_FOR_PREDOMINANCE:
        return "minimal"
    parts = []
    thirds = sorted(("upper", "middle", "lower"), key=val, reverse=True)
    if val(thirds[0]) > 0 and val(thirds[0]) >= ratio * val(thirds[1]):
        parts.append(thirds[0])
    for a, b in (("subpleural", "central"), ("left", "right")):
        hi, lo = (a, b) if val(a) >= val(b) else (b, a)
        if val(hi) > 0 and val(hi) >= ratio * val(lo):
            parts.append(hi)
    return ", ".join(parts) if parts else "diffuse"


def extent_summary(table: np.ndarray, positive: np.ndarray, rule: str) -> dict:
    """The result.json record of one prompt (or pattern): lung fraction, by zone, predominance, rule."""
    fraction, by_zone, _ = zone_fractions(table, positive)
    return {"lung_fraction": fraction, "by_zone": by_zone,
            "predominance": predominance(by_zone, lung_fraction=fraction), "rule": rule,
            "positive_patches": int(np.count_nonzero(positive))}


def truth_extent(codes: np.ndarray, disease_mask: np.ndarray, spacing_mm, slice_slab_mm: Optional[np.ndarray] = None
                 ) -> tuple[float, dict]:
    """Ground-truth extent of a voxel mask by the same zones (for phantoms): (lung fraction, {zone: fraction})."""
    nz = codes.shape[0]
    if slice_slab_mm is None:
        slice_slab_mm = np.full(nz, float(spacing_mm[2]))
    weights = np.repeat(np.asarray(slice_slab_mm, dtype=np.float64), codes[0].size).reshape(codes.shape)
    lung = codes != LungZones.OUTSIDE
    total = np.bincount(codes[lung], weights=weights[lung], minlength=N_CODES)
    dis = lung & np.asarray(disease_mask, dtype=bool)
    pos = np.bincount(codes[dis], weights=weights[dis], minlength=N_CODES)
    by_zone = {name: (float(pos[sel].sum() / total[sel].sum()) if total[sel].sum() > 0 else float("nan"))
               for name, sel in _zone_masks().items()}
    return float(pos.sum() / total.sum()) if total.sum() > 0 else float("nan"), by_zone


def rule_text(z: float = DEFAULT_Z, rind_mm: float = DEFAULT_RIND_MM, reference: Optional[dict] = None) -> str:
    calibrated = ""
    if reference is not None:
        calibrated = (f", and more than {z:g} robust SDs above the model's normal-lung reference for this prompt "
                      f"({reference.get('scans', '?')} normal scans, {reference.get('patches', '?')} patches)")
    return RULE.format(k=z, rind=rind_mm, calibrated=calibrated)


def extents_for(table: np.ndarray, probabilities: dict, prompts: Sequence[str], z: float = DEFAULT_Z,
                rind_mm: float = DEFAULT_RIND_MM, references: Optional[dict] = None) -> dict:
    """{prompt: extent record} for each prompt's patch probabilities (``references``: prompt -> normal reference)."""
    out = {}
    for p in prompts:
        ref = (references or {}).get(p)
        out[p] = extent_summary(table, positive_patches(probabilities[p], z, ref), rule_text(z, rind_mm, ref))
    return out
