"""ILD patterns (UIP-, NSIP- and HP-like) and benign findings painted into the lungs."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from .anatomy import _Anatomy
from .constants import _AIR_HU, _IPF, _SSC
from .fields import _Field, _noise_field, _normalize, _sigmoid, _smoothstep
from .raster import _tube_chunks

if TYPE_CHECKING:
    from .builder import _Builder
    from .raster import _Canvas

class _Disease:
    """Draws ILD patterns (or benign findings) into the canvas and records facts for the report."""

    def __init__(self, builder: _Builder, cv: _Canvas, rng, involvement=None, with_patterns=()):
        self.b, self.cv, self.rng = builder, cv, rng
        #: Patterns drawn whatever the style's own draw says (``generate_phantom(with_patterns=...)``).
        self.with_patterns = frozenset(with_patterns)
        self.an, self.grid = builder.an, builder.grid
        self.info = {}
        #: Requested fraction of the lung inside the disease mask; None: the style's own draw.
        self.involvement = involvement
        #: How much the zone outgrows the style's own draw (>= 1); spatial limits that hold a
        #: pattern to the bases or the pleura widen by it, so its density per involved lung holds.
        self.grow = 1.0
        #: The fibrosis zone on the image grid, and a region per pattern (filled while painting).
        self.zone = np.zeros(self.grid.shape, bool)
        self.masks = {}
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

    def _mask(self, name):
        m = self.masks.get(name)
        if m is None:
            m = self.masks[name] = np.zeros(self.grid.shape, bool)
        return m

    def _spread(self, sev, drawn_fraction, fraction):
        """Severity remapped so that the most severe ``fraction`` of the lung gets the values the
        most severe ``drawn_fraction`` had (the style's own draw); unchanged without a requested
        involvement.

        The rank order, hence where the disease starts and how it spreads, is the style's; the
        values inside the zone (intensity of the patterns, the honeycomb threshold) follow the
        same distribution over the zone at any extent, so patterns are as dense per involved lung
        when widespread as when focal.
        """
        if self.involvement is None:
            return sev
        vals = np.sort(sev[self.b.c_lung], axis=None)
        if vals.size == 0 or fraction <= 0:
            return sev
        self.grow = max(1.0, fraction / drawn_fraction)
        # the style's own top of the range (what ``_threshold`` takes at the 99.5th centile), so
        # the patterns' intensity over the zone is the style's at any extent
        self._top = float(np.quantile(vals, 0.995))
        more_severe = 1.0 - np.searchsorted(vals, sev, side="right") / vals.size
        q = np.clip(1.0 - drawn_fraction * more_severe / fraction, 0.0, 1.0)
        return np.interp(q * (vals.size - 1), np.arange(vals.size), vals).astype(np.float32)

    def _zone(self, sev, drawn_fraction, zone_fraction):
        """(severity, threshold, top) of one style: its severity spread to ``zone_fraction`` of the lung
        (``_spread``), thresholded as the style's own draw would be, then on the image grid."""
        sev = self._spread(sev, drawn_fraction, zone_fraction)
        t, top = self._threshold(sev, drawn_fraction)
        t, top = self._fine_threshold(sev, zone_fraction, t, top)
        return sev, t, top

    def _fine_threshold(self, sev, fraction, t, top):
        """``(t, top)``: the threshold that puts ``fraction`` of the image-grid lung in
        ``sev > t`` and the style's top severity (with a requested involvement; the coarse-grid
        values otherwise)."""
        if self.involvement is None:
            return t, top
        top = getattr(self, "_top", top)
        t = self._fine_quantile(sev, fraction, t)
        return t, max(top, t + 1e-6)

    def _fine_quantile(self, sev, fraction, t):
        if fraction <= 0:
            return float("inf")
        f = self._field(sev)
        vals = []
        self._slices(lambda k, z, crop: vals.append(f.plane(z)[self.cv.lung[k][crop]]), [f])
        vals = np.concatenate(vals) if vals else np.zeros(0, np.float32)
        if vals.size == 0:
            return t
        if fraction >= 1:
            return float(vals.min()) - 1e-6
        return float(np.quantile(vals, 1.0 - fraction))

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
        """Paint ``subtype``'s patterns; returns the names drawn (``self.masks`` holds their regions)."""
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
        zone_fraction = target if self.involvement is None else self.involvement
        sev, t, top = self._zone(sev, target, zone_fraction)
        want = {"reticulation"}
        if rng.random() < 0.85:
            want.add("honeycombing")
        if rng.random() < 0.8:
            want.add("traction bronchiectasis")
        if rng.random() < 0.15:
            want.add("ground-glass opacity")
        want |= self.with_patterns  # after the draws above: the random streams do not change
        drawn = self._fibrosis(rng, sev, t, top, want, haze_hu=rng.uniform(-800, -740),
                               ggo_hu=rng.uniform(-620, -520), fine_mm=s * rng.uniform(3.5, 5.0),
                               line_mm=s * rng.uniform(0.4, 0.6))
        if "honeycombing" in want:
            n = self._honeycomb(rng, sev, t, top, depth_mm=s * rng.uniform(9, 18))
            if n:
                drawn.add("honeycombing")
        if "traction bronchiectasis" in want and self._traction(rng, sev, t, rng.integers(5, 13) * self.grow):
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
        zone_fraction = target if self.involvement is None else self.involvement
        sev, t, top = self._zone(sev, target, zone_fraction)
        want = {"ground-glass opacity"}
        if rng.random() < 0.85:
            want.add("reticulation")
        if rng.random() < 0.5:
            want.add("traction bronchiectasis")
        if rng.random() < 0.1:
            want.add("honeycombing")
        want |= self.with_patterns
        drawn = self._fibrosis(rng, sev, t, top, want, haze_hu=None, ggo_hu=rng.uniform(-560, -380),
                               fine_mm=s * rng.uniform(3.0, 4.0), line_mm=s * rng.uniform(0.3, 0.45),
                               line_gain=0.6)
        if "honeycombing" in want and self._honeycomb(rng, sev, t, top, depth_mm=s * 6, sparse=0.2):
            drawn.add("honeycombing")
        if "traction bronchiectasis" in want and self._traction(rng, sev, t, rng.integers(3, 8) * self.grow):
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
        want |= self.with_patterns
        zone_share = 0.7 if "mosaic attenuation" in want else 1.0
        if self.involvement is None:
            zone_fraction, mosaic_fraction = target * zone_share, target * (1 - zone_share)
        else:
            # the dark lobules lie outside the zone: their share shrinks as the zone fills the lung
            v = self.involvement
            mosaic_fraction = min(v * (1 - zone_share), 0.5 * (1 - v))
            zone_fraction = v - mosaic_fraction
        sev, t, top = self._zone(sev, target * zone_share, zone_fraction)
        mosaic = None
        if "mosaic attenuation" in want:
            lob = self._patchy(rng.uniform(12, 20))
            rest = b.c_lung & (sev <= t)
            # the dark lobules take the rest of the target, drawn from the lung outside the zone
            share = mosaic_fraction * b.c_lung.sum() / max(rest.sum(), 1)
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
        if "traction bronchiectasis" in want and self._traction(rng, sev, t, rng.integers(2, 6) * self.grow):
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
                    self._mask("mosaic attenuation")[k][crop][zy, zx] = True
                    seen["mosaic"] += len(zy)
            if not zone.any():
                return
            inten = np.clip((sv - t) / span, 0, 1) * zone
            # fade in over the first part of the zone so its border is not a hard edge
            ramp = np.clip((sv - t) / (0.12 * span), 0, 1) * zone
            dis |= zone
            self.zone[k][crop] |= zone
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
                self._mask("ground-glass opacity")[k][crop] |= w > 0.3
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
                # the region of the net: zone voxels where its lines are drawn at >= 25 % contrast
                contrast = (0.45 + 0.55 * np.sqrt(inten[zy, zx])) * ramp[zy, zx] * line_gain
                self._mask("reticulation")[k][crop][zy[contrast >= 0.25], zx[contrast >= 0.25]] = True

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
        # keep the work bounded on tiny spacings (higher with a requested involvement, so that a
        # lattice over the whole lung is not thinned out)
        cap = 600_000 if self.involvement is None else 4_000_000
        if len(pts) > cap:
            pts = pts[rng.choice(len(pts), cap, replace=False)]
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
        # widespread disease takes honeycombing deeper and higher (grow = 1 keeps the style's draw)
        depth_mm, h_max = depth_mm * self.grow, 0.5 * self.grow
        zone = (b.c_lung & (sev > hc_t) & (b.c_pleura < depth_mm) & (self.c_h < h_max))
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
        z_top = an.z_at(h_max + 0.05)
        limit = None if self.involvement is None else self.zone   # inside the requested extent
        lumen_count = [0]

        def paint(k, z, crop):
            if z > z_top:
                return
            lung = cv.lung[k][crop]
            near = lung & (f_p.plane(z) < depth_mm + r_cap)
            if limit is not None:
                near &= limit[k][crop]
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
            self._mask("honeycombing")[k][crop][zy, zx] = True
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
        n_paths = int(min(round(n_paths), len(cand)))
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
        region = cv.lung if self.involvement is None else cv.lung & self.zone
        iw, ww = cv.paint(_tube_chunks(g, p0, p1, rr + wall, rr + wall, edge), an.hu["wall"], region=region)
        il, wl = cv.paint(_tube_chunks(g, p0, p1, rr, rr, edge), _AIR_HU, region=region)
        cv.disease.reshape(-1)[iw[ww > 0.5]] = True
        self._mask("traction bronchiectasis").reshape(-1)[iw[ww > 0.5]] = True
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
        region = cv.lung if self.involvement is None else cv.lung & self.zone
        idx, w = cv.paint(_tube_chunks(g, pts, pts, r, r, max(1.8 * s, g.voxel_mm)),
                          rng.uniform(-380, -250), region=region, amplitude=rng.uniform(0.85, 1.0),
                          only_below=-250)
        cv.disease.reshape(-1)[idx[w > 0.35]] = True
        self._mask("centrilobular nodules").reshape(-1)[idx[w > 0.35]] = True
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
