"""The chest: anatomy drawn from the seed, and each axial slice painted from it."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .constants import _AIR_HU, TABLE_CORE_HU, TABLE_CORE_MM, TABLE_SHELL_MM
from .fields import _Grid, _capsule_d2, _ellipse_q

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
