"""Assembling one phantom: the passes over the volume, in order."""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .anatomy import _render_slice, _rib_segments, _SliceMaps
from .constants import _AIR_HU, _DIRECTION, _STREAM_ANATOMY, _STREAM_BENIGN, _STREAM_DISEASE, _STREAM_NOISE, _STREAM_REPORT, PATTERNS
from .disease import _Disease
from .fields import _Field, _normalize
from .raster import _Canvas, _tube_chunks
from .report import _make_report
from .trees import _partition_tree, _territory_points
from .volume import Phantom
from ..phantom_signature import stamp

class _Builder:
    def __init__(self, grid, anat, seed, ild, subtype, noise_hu, padding_value, involvement=None, with_patterns=()):
        self.grid, self.an, self.seed = grid, anat, seed
        self.ild, self.subtype, self.involvement = ild, subtype, involvement
        self.with_patterns = tuple(with_patterns)
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
        disease = _Disease(self, cv, np.random.default_rng([self.seed, _STREAM_DISEASE]),
                           self.involvement if self.ild else None, self.with_patterns if self.ild else ())
        if self.ild:
            patterns = disease.draw(self.subtype)
        else:
            patterns = []
            disease.draw_benign(np.random.default_rng([self.seed, _STREAM_BENIGN]))
        cv.disease &= cv.lung
        # one region per pattern drawn, each inside the disease mask
        pattern_masks = {q: disease.masks[q] & cv.disease for q in PATTERNS if q in patterns and q in disease.masks}
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
            "involvement": self.involvement,
        }
        if self.with_patterns and self.ild:
            labels["with_patterns"] = list(self.with_patterns)
        report = _make_report(np.random.default_rng([self.seed, _STREAM_REPORT]), labels, self.info)
        return Phantom(hu=hu16, spacing_mm=tuple(g.spacing), origin_mm=tuple(g.origin),
                       direction=_DIRECTION, lung_mask=cv.lung, disease_mask=cv.disease,
                       airway_mask=cv.airway, labels=labels, report=report, body_mask=body,
                       pattern_masks=pattern_masks)

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
        # the generator's mark, read back by phantom_signature.carries_signature from the voxels
        return stamp(out)
