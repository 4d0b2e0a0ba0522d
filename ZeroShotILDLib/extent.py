"""How much of the lung, and where: extent of a prompted finding, overall and by zone.

Step after scoring (patch embeddings -> extent). Pure functions on arrays and geometry:

1. ``lung_zones``: every lung voxel gets a zone code: side (patient left/right, from RAS, not the
   array's x), cranio-caudal third of *its own* lung's extent along the patient S axis, and whether
   it lies in the subpleural rind (distance to the pleural surface <= ``rind_mm``, a Euclidean
   distance transform inside the lung mask with the true voxel spacing). Patient coordinates come
   from the scan's direction cosines, so a flipped or feet-first scan gets the same zones.
   ``imaging_coverage`` says whether the lungs were imaged whole (a scan of the bases only, or
   lungs cut off by the first or last slice), and which cranio-caudal zones can be named.
2. ``zone_volume_table``: for every scored patch, the lung volume (mL) per zone code that the
   patch stands for (its box, through the slab of slices it represents; each slice counted over its
   own slab, so interval series are measured at their true slice positions). Computed once per scan;
   extent for any prompt is then a sum over the positive rows (re-prompting stays cheap). Every
   box holding lung is scored (``patches.scored_patches``), not only the montage's candidates, so
   the pleura is looked at; the lung in no box (the last row) is reported, never hidden.
3. ``positive_patches``: the rule (one for typed prompts and pattern prompts alike), and
   ``extent_summary``: the share of each zone's *whole* lung volume, and the words that go with it.

The rule, in plain words. A patch's score for a finding X is how much closer its embedding is to
the text X than to the text of normal lung (``cos(patch, X) - cos(patch, "normal lung")``, the
contrast the pattern map has always used). Raw zero-shot scores have a model- and prompt-specific
offset, so that score is compared with what *normal* lungs score for the same model and prompt: a
reference built from normal scans (``calibration.py``, ``zeroshot-ild calibrate``) stored beside
the weights. A patch counts as X when its score is more than ``z`` robust standard deviations
above the normal lungs' median, and when it is also nearer X than X's negation ("no X", the pair
the probabilities use; ``affirmed``): far from normal says *diseased*, the negation says *with what*,
so "honeycombing" does not read all fibrosis, and co-existing patterns each count. The reference does
not move with the scan, so a lung that is 80 % diseased reads about 80 % (the earlier per-scan rule,
centred on the scan's own median patch, read such a lung as 0 %). Without a reference for the model and prompt the extent is still
computed, with the text alone deciding (the patch is closer to X than to normal lung), and every
output marks it *uncalibrated*.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from .calibration import reference_arrays
from .results import PatchSet

#: Default depth (mm) of the subpleural rind: lung within this distance of the pleural surface.
DEFAULT_RIND_MM = 10.0
#: Default number of normal-lung robust SDs above the normal median for a positive box.
DEFAULT_Z = 4.0
#: Default number of positive grid neighbours (of 6) a positive box needs.
DEFAULT_MIN_NEIGHBOURS = 2
ZONES = ("upper", "middle", "lower", "left", "right", "subpleural", "central")
THIRDS = ("lower", "middle", "upper")  # third index 0, 1, 2 (from the base up)
#: A zone share must be this many times the other side's share to count as predominant.
PREDOMINANCE_RATIO = 1.5
#: ... and at least this share of its own zone (a few stray boxes have no distribution to speak of).
MIN_ZONE_SHARE = 0.05
N_CODES = 12  # side (2) x third (3) x subpleural (2)
#: Severity words by the share of the whole lung. "limited" / "extensive" split at 20 % as in the
#: Goh et al. (2008) staging of fibrotic lung disease; "minimal" under 5 % (a few boxes).
SEVERITY = ((0.0, "none"), (0.05, "minimal"), (0.20, "limited"), (1.01, "extensive"))
#: An end slice whose lung area is at least this share of the largest slice's cuts the lungs off
#: (an apex or a base tapers to a few voxels).
CUT_AREA_SHARE = 0.15
#: Lung span (mm, apex to base) assumed for a lung imaged only in part, to place its thirds from the
#: end that was imaged (adult lungs: ~ 200-280 mm).
NOMINAL_LUNG_HEIGHT_MM = 240.0

RULE = ("A box of lung counts as '{prompt}' when its similarity to that text, minus its similarity to "
        "'{normal}', is more than {k:g} robust standard deviations above what normal lungs score "
        "({reference}). Extent is the lung volume in such boxes as a share of each zone's whole lung volume; "
        "every box holding lung is scored ({scored:.1%} of the lung lies in a scored box). Zones: thirds of "
        "each lung's height, left/right, subpleural = within {rind:g} mm of the pleura.")
RULE_UNCALIBRATED = ("A box of lung counts as '{prompt}' when it is more similar to that text than to "
                     "'{normal}'. UNCALIBRATED: no normal-lung reference exists for this model and prompt, so "
                     "the figure depends on the model's offset for this text; run 'zeroshot-ild calibrate' "
                     "on a few normal scans to build one. Extent is the lung volume in such boxes as a share of "
                     "each zone's whole lung volume ({scored:.1%} of the lung lies in a scored box). Zones: thirds "
                     "of each lung's height, left/right, subpleural = within {rind:g} mm of the pleura.")


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
    # Imported here: the Slicer module reads results through this module in Slicer's own process,
    # which must not pay for scipy/edt (and the lung mask's imports) when it only reads a result.
    import edt

    from .lung_mask import worker_threads

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
    from scipy import ndimage

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
    s_range_mm: dict  # {"left": (lo, hi), "right": (lo, hi)} patient S span the thirds are cut from
    rind_mm: float
    #: ``imaging_coverage``: whether the lungs were imaged whole and which thirds could not be.
    coverage: Optional[dict] = None

    OUTSIDE = 255


def imaging_coverage(lung_mask: np.ndarray, spacing_mm, origin_mm=(0.0, 0.0, 0.0),
                     direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), slice_positions_mm=None) -> dict:
    """Whether the lungs were imaged from apex to base: {"complete", "cut": ["superior"|"inferior"], "note"}.

    A lung ends in a taper (apex, costophrenic recesses), so an end slice of the scan whose lung
    area is ``CUT_AREA_SHARE`` or more of the largest slice's means the lungs go on beyond the scan.
    Which end is superior comes from the patient geometry, not the array order.
    """
    mask = np.asarray(lung_mask, dtype=bool)
    area = mask.sum(axis=(1, 2)).astype(np.float64)
    out = {"complete": True, "cut": [], "note": ""}
    if not area.any():
        return out
    nz = mask.shape[0]
    offsets = _slice_offsets_mm(nz, spacing_mm, slice_positions_mm)
    s_first = _rs_of(0, np.zeros(1), np.zeros(1), spacing_mm, origin_mm, direction, offsets)[1][0]
    s_last = _rs_of(nz - 1, np.zeros(1), np.zeros(1), spacing_mm, origin_mm, direction, offsets)[1][0]
    top_is_last = s_last >= s_first
    biggest = float(area.max())
    for index, end in ((0, "first"), (nz - 1, "last")):
        if area[index] >= CUT_AREA_SHARE * biggest:
            superior = (end == "last") == top_is_last
            out["cut"].append("superior" if superior else "inferior")
    out["cut"] = sorted(set(out["cut"]), reverse=True)
    if out["cut"]:
        out["complete"] = False
        where = " and ".join(f"{c} end" for c in out["cut"])
        out["note"] = (f"lungs incompletely imaged: cut off at the scan's {where}; extent is of the imaged lung, "
                       "and zones that were not imaged are reported as such")
    return out


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
    coverage = imaging_coverage(mask, spacing_mm, origin_mm, direction, slice_positions_mm)
    # A lung cut off at one end: its thirds are placed from the end that was imaged, over a
    # nominal adult lung height, so a scan of the bases has lower (and perhaps middle) zones and
    # no upper one, instead of calling its top slices "upper". Cut at both ends: no anchor, the
    # imaged span is split and ``coverage["not_imaged"]`` says the thirds are not anatomical.
    cut = set(coverage["cut"])
    for side in (0, 1):
        if not np.isfinite(s_lo[side]):
            continue
        height = max(s_hi[side] - s_lo[side], NOMINAL_LUNG_HEIGHT_MM)
        if cut == {"superior"}:
            s_hi[side] = s_lo[side] + height
        elif cut == {"inferior"}:
            s_lo[side] = s_hi[side] - height
    rind = subpleural_rind(mask, spacing_mm, rind_mm, slice_positions_mm)
    seen = np.zeros(3, dtype=bool)
    for z, (ys, xs) in voxels.items():
        r, s_mm = _rs_of(z, ys, xs, *geo)
        left = r < midline
        lo = np.where(left, s_lo[1], s_lo[0])
        hi = np.where(left, s_hi[1], s_hi[0])
        height = np.maximum(hi - lo, 1e-9)
        third = np.clip(np.floor(3.0 * (s_mm - lo) / height), 0, 2)
        codes[z, ys, xs] = code_of(left, third, rind[z, ys, xs])
        seen[np.unique(third).astype(int)] = True
    ranges = {name: (s_lo[i], s_hi[i]) for i, name in ((0, "right"), (1, "left")) if np.isfinite(s_lo[i])}
    if cut == {"superior", "inferior"}:
        coverage["not_imaged"] = []
        coverage["thirds_anatomical"] = False
    else:
        coverage["not_imaged"] = [THIRDS[i] for i in range(3) if not seen[i]] if cut else []
        coverage["thirds_anatomical"] = True
    return LungZones(codes, float(midline), ranges, float(rind_mm), coverage)


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
def contrasts(features: np.ndarray, finding, normal) -> np.ndarray:
    """(N,) ``cos(patch, finding) - cos(patch, normal lung)`` for unit image ``features`` (N, D) and unit
    text embeddings ``finding`` and ``normal`` (D,): the score every extent and pattern decision uses."""
    feats = np.asarray(features, dtype=np.float32)
    diff = np.asarray(finding, dtype=np.float32) - np.asarray(normal, dtype=np.float32)
    return (feats @ diff).astype(np.float64)


def standardised(scores: np.ndarray, reference: Optional[Mapping], lung_fraction: Optional[np.ndarray] = None
                 ) -> np.ndarray:
    """Scores in normal-lung robust SDs above the normal median (``reference``; per lung-fraction bin
    when it has bins and ``lung_fraction`` is given), or the raw contrast (whose 0 is "as close to the
    finding as to normal lung") without one."""
    s = np.asarray(scores, dtype=np.float64)
    if reference is None:
        return s.copy()
    centre, spread = reference_arrays(reference, lung_fraction, s.size)
    return (s - centre) / spread


def box_neighbours(slice_index: np.ndarray, row0: np.ndarray, col0: np.ndarray) -> np.ndarray:
    """(N, 6) index of each box's grid neighbours (-1 where none): the boxes before and after it in the
    same slice's rows and columns, and the same box on the scored slices below and above."""
    n = len(slice_index)
    out = np.full((n, 6), -1, dtype=np.int64)
    if n == 0:
        return out
    # Ranks on the shared grid (any stride): neighbours differ by one rank along one axis.
    ranks = [np.unique(np.asarray(a), return_inverse=True)[1].astype(np.int64)
             for a in (slice_index, row0, col0)]
    dims = [int(r.max()) + 2 for r in ranks]
    key = (ranks[0] * dims[1] + ranks[1]) * dims[2] + ranks[2]
    lookup = dict(zip(key.tolist(), range(n)))
    for k, (axis, step) in enumerate(((0, -1), (0, 1), (1, -1), (1, 1), (2, -1), (2, 1))):
        moved = [r + step if a == axis else r for a, r in enumerate(ranks)]
        other = (moved[0] * dims[1] + moved[1]) * dims[2] + moved[2]
        valid = moved[axis] >= 0
        out[valid, k] = [lookup.get(v, -1) for v in other[valid].tolist()]
    return out


def supported(positive: np.ndarray, neighbours: Optional[np.ndarray], min_neighbours: int) -> np.ndarray:
    """``positive`` boxes that have at least ``min_neighbours`` positive grid neighbours (``box_neighbours``).

    Why: a finding occupies a region, while a zero-shot model's errors on normal lung are scattered
    boxes. On phantom-demo (held-out phantoms, bench/RESULTS.md) asking two of the six neighbours to
    agree cut normal lungs' extent from 3-6 % to 1-2 % and kept 95-99 % of the sensitivity to disease.
    """
    positive = np.asarray(positive, dtype=bool)
    if neighbours is None or min_neighbours <= 0 or positive.size == 0:
        return positive
    padded = np.append(positive, False)  # index -1 (no neighbour) reads False
    votes = padded[neighbours].sum(axis=1)
    return positive & (votes >= min_neighbours)


def positive_patches(scores: np.ndarray, z: float = DEFAULT_Z, reference: Optional[Mapping] = None,
                     lung_fraction: Optional[np.ndarray] = None, neighbours: Optional[np.ndarray] = None,
                     min_neighbours: int = 0) -> np.ndarray:
    """(N,) bool: calibrated, more than ``z`` normal-lung robust SDs above the normal median (of boxes
    with a like lung fraction); uncalibrated, closer to the finding's text than to normal lung's; and,
    with ``neighbours``, supported by at least ``min_neighbours`` positive grid neighbours."""
    positive = standardised(scores, reference, lung_fraction) > (z if reference is not None else 0.0)
    return supported(positive, neighbours, min_neighbours)


# ----------------------------------------------------------------------------------------------
# Fractions and the words that go with them
# ----------------------------------------------------------------------------------------------
def _zone_masks() -> dict:
    code = np.arange(N_CODES)
    left, third, sub = code // 6, (code % 6) // 2, code % 2
    return {"upper": third == 2, "middle": third == 1, "lower": third == 0, "left": left == 1,
            "right": left == 0, "subpleural": sub == 1, "central": sub == 0}


def zone_volumes_ml(rows: np.ndarray) -> dict:
    """{zone: mL} summed over ``rows`` of a ``zone_volume_table`` (e.g. ``table[:-1]``: the scored lung)."""
    total = np.asarray(rows).sum(axis=0)
    return {name: float(total[sel].sum()) for name, sel in _zone_masks().items()}


def zone_fractions(table: np.ndarray, positive: np.ndarray) -> tuple[float, dict, dict]:
    """(lung fraction, {zone: fraction}, {zone: lung mL}): positive boxes' lung over each zone's *whole*
    lung (scored or not: lung in no box counts as not positive, and ``scored_share`` says how much that is)."""
    scored = table[:-1]
    pos = scored[np.asarray(positive, dtype=bool)].sum(axis=0)
    total = table.sum(axis=0)
    fractions, volumes = {}, {}
    for name, sel in _zone_masks().items():
        t = float(total[sel].sum())
        fractions[name] = float(pos[sel].sum()) / t if t > 0 else float("nan")
        volumes[name] = t
    whole = float(total.sum())
    return (float(pos.sum()) / whole if whole > 0 else float("nan")), fractions, volumes


def scored_share(table: np.ndarray) -> tuple[float, dict]:
    """(share of the lung inside a scored box, {zone: share}) from a ``zone_volume_table``."""
    total = table.sum(axis=0)
    scored = table[:-1].sum(axis=0)
    by_zone = {name: (float(scored[sel].sum() / total[sel].sum()) if total[sel].sum() > 0 else float("nan"))
               for name, sel in _zone_masks().items()}
    whole = float(total.sum())
    return (float(scored.sum()) / whole if whole > 0 else float("nan")), by_zone


def severity(lung_fraction: float) -> str:
    """"none", "minimal" (< 5 %), "limited" (< 20 %) or "extensive" by the share of the whole lung."""
    if not np.isfinite(lung_fraction) or lung_fraction <= 0:
        return "none"
    for upper, word in SEVERITY[1:]:
        if lung_fraction < upper:
            return word
    return SEVERITY[-1][1]


def distribution(by_zone: Mapping, ratio: float = PREDOMINANCE_RATIO, not_imaged: Sequence[str] = (),
                 thirds_anatomical: bool = True) -> str:
    """"lower, subpleural"-style words that follow the zone figures, or "diffuse", or "" (nothing positive).

    The rule, stated once: a zone is named when its share is at least ``MIN_ZONE_SHARE`` of its own
    lung and at least ``ratio`` times its counterpart's (the largest third against the larger of
    the other two; subpleural against central; left against right). Thirds that were not imaged
    (or cannot be placed) take no part.
    """
    def val(k):
        v = by_zone.get(k)
        return 0.0 if v is None or not np.isfinite(v) else float(v)

    if max(val(k) for k in ZONES) <= 0:
        return ""
    parts = []
    thirds = [t for t in ("upper", "middle", "lower") if t not in not_imaged] if thirds_anatomical else []
    if len(thirds) >= 2:
        ordered = sorted(thirds, key=val, reverse=True)
        if val(ordered[0]) >= MIN_ZONE_SHARE and val(ordered[0]) >= ratio * val(ordered[1]):
            parts.append(ordered[0])
    for a, b in (("subpleural", "central"), ("left", "right")):
        hi, lo = (a, b) if val(a) >= val(b) else (b, a)
        if val(hi) >= MIN_ZONE_SHARE and val(hi) >= ratio * val(lo):
            parts.append(hi)
    return ", ".join(parts) if parts else "diffuse"


def predominance(by_zone: Mapping, lung_fraction: Optional[float] = None, ratio: float = PREDOMINANCE_RATIO,
                 not_imaged: Sequence[str] = (), thirds_anatomical: bool = True) -> str:
    """The summary line: severity, then the distribution words ("limited, lower, subpleural"; "none")."""
    if lung_fraction is None:
        lung_fraction = max((float(v) for v in by_zone.values() if v is not None and np.isfinite(v)), default=0.0)
    word = severity(lung_fraction)
    if word == "none":
        return "none"
    where = distribution(by_zone, ratio, not_imaged, thirds_anatomical)
    return f"{word}, {where}" if where else word


def extent_summary(table: np.ndarray, positive: np.ndarray, rule: str, *, calibrated: bool = False,
                   reference: Optional[Mapping] = None, coverage: Optional[Mapping] = None) -> dict:
    """The result.json record of one finding: lung fraction, by zone (with mL), words, rule, provenance."""
    fraction, by_zone, volumes = zone_fractions(table, positive)
    coverage = dict(coverage or {})
    not_imaged = list(coverage.get("not_imaged") or [])
    anatomical = bool(coverage.get("thirds_anatomical", True))
    # A zone outside the scan has no figure (None: "not imaged"), never 0 %.
    by_zone = {name: (None if name in not_imaged or not np.isfinite(v) else v) for name, v in by_zone.items()}
    positive_ml = {name: (v * volumes[name] if v is not None else None) for name, v in by_zone.items()}
    share, share_by_zone = scored_share(table)
    share_by_zone = {name: (v if np.isfinite(v) else None) for name, v in share_by_zone.items()}
    record = {"lung_fraction": fraction, "by_zone": by_zone,
              "positive_ml": {k: (round(v, 2) if v is not None else None) for k, v in positive_ml.items()},
              "severity": severity(fraction),
              "distribution": distribution(by_zone, not_imaged=not_imaged, thirds_anatomical=anatomical),
              "predominance": predominance(by_zone, fraction, not_imaged=not_imaged, thirds_anatomical=anatomical),
              "calibrated": bool(calibrated), "rule": rule,
              "positive_patches": int(np.count_nonzero(positive)),
              "scored_share": share, "scored_share_by_zone": share_by_zone}
    if not_imaged:
        record["not_imaged"] = not_imaged
    if not anatomical:
        record["thirds_not_anatomical"] = True
    if reference is not None:
        record["reference"] = {k: reference[k] for k in ("scans", "patches", "weights_sha256", "normal_prompt",
                                                         "centre", "spread", "created") if k in reference}
    return record


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


def affirmed(negation_scores: np.ndarray) -> np.ndarray:
    """(N,) bool: boxes nearer the finding's text than its negation's (``cos(patch, X) - cos(patch, "no X")
    > 0``: the probability of X from the prompt pair is above 0.5).

    Why: distance from normal lung says "diseased", not "which finding": on phantom-demo every pattern
    prompt read all disease as itself (honeycombing: mean error 32 points). Patterns co-exist (a fibrotic
    box is reticulation *and* honeycombing), so they are not made to compete for a box either (the
    earlier nearest-pattern rule halved reticulation in fibrotic lungs); each word is asked on its own
    whether the box holds it, by the same prompt pair its probability uses (bench/RESULTS.md).
    """
    return np.asarray(negation_scores, dtype=np.float64) > 0.0


def rule_text(prompt: str, normal_prompt: str, z: float = DEFAULT_Z, rind_mm: float = DEFAULT_RIND_MM,
              reference: Optional[Mapping] = None, scored: float = 1.0, min_neighbours: int = 0,
              negation: Optional[str] = None) -> str:
    scored = scored if np.isfinite(scored) else 0.0
    region = (f" A box counts only when at least {min_neighbours} of its 6 grid neighbours (beside it, above and "
              "below) count too: a finding is a region, a stray box is noise." if min_neighbours > 0 else "")
    if negation:
        region += (f" It must also be nearer to '{prompt}' than to '{negation}' (its probability above 0.5): "
                   "far from normal lung says a box is diseased, this says with what.")
    if reference is None:
        return RULE_UNCALIBRATED.format(prompt=prompt, normal=normal_prompt, rind=rind_mm, scored=scored) + region
    made = (f"reference from {reference.get('scans', '?')} normal scans, {reference.get('patches', '?')} boxes, "
            "for these weights")
    return RULE.format(prompt=prompt, normal=normal_prompt, k=z, reference=made, rind=rind_mm, scored=scored) + region


def extents_for(table: np.ndarray, scores: Mapping, prompts: Sequence[str], normal_prompt: str,
                z: float = DEFAULT_Z, rind_mm: float = DEFAULT_RIND_MM, references: Optional[Mapping] = None,
                coverage: Optional[Mapping] = None, lung_fraction: Optional[np.ndarray] = None,
                neighbours: Optional[np.ndarray] = None, min_neighbours: int = 0,
                negations: Optional[Mapping] = None, positives_out: Optional[dict] = None) -> dict:
    """{prompt: extent record} from each prompt's contrast ``scores`` (N,) (``references``: prompt -> normal
    reference or None). Typed prompts and pattern prompts both come through here, each on its own: one
    word, one number, whatever else is scored beside it.

    ``negations``: prompt -> (text of its negation, (N,) ``cos(patch, prompt) - cos(patch, negation)``); a
    box counts only where it is positive (``affirmed``).
    ``positives_out`` (a dict) receives each prompt's positive boxes, for painting the pattern map.
    """
    out = {}
    share = scored_share(table)[0]
    for p in prompts:
        ref = (references or {}).get(p)
        negation = (negations or {}).get(p)
        # The region rule comes last: a box whose negation wins lends no support to its neighbours.
        positive = positive_patches(scores[p], z, ref, lung_fraction)
        if negation is not None:
            positive &= affirmed(negation[1])
        positive = supported(positive, neighbours, min_neighbours)
        text = rule_text(p, normal_prompt, z, rind_mm, ref, share, min_neighbours,
                         negation[0] if negation is not None else None)
        out[p] = extent_summary(table, positive, text,
                                calibrated=ref is not None, reference=ref, coverage=coverage)
        if positives_out is not None:
            positives_out[p] = positive
    return out
