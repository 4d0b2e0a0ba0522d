"""Extent (issue 14): zones in patient coordinates, the subpleural rind, interval-series volumes, the positive rule."""
import numpy as np
import pytest

from ZeroShotILDLib import extent as ex
from ZeroShotILDLib.geometry import slab_thickness_mm
from ZeroShotILDLib.results import PatchSet
from ZeroShotILDLib.scan import Scan

IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)


def two_lungs(nz=30, ny=20, nx=40):
    """Two blocks: array x 2..15 and 24..37 (LPS identity: higher x = patient left); the left one shorter in z."""
    m = np.zeros((nz, ny, nx), bool)
    m[0:30, 4:16, 2:16] = True    # patient right lung, slices 0..29
    m[6:30, 4:16, 24:38] = True   # patient left lung, slices 6..29
    return m


def zone_volumes(codes):
    return np.bincount(codes[codes != ex.LungZones.OUTSIDE], minlength=ex.N_CODES)


def test_sides_and_thirds_in_patient_coordinates():
    spacing = (1.0, 1.0, 2.0)
    z = ex.lung_zones(two_lungs(), spacing, (0, 0, 0), IDENTITY, rind_mm=1.0)
    left = (z.codes // 6) == 1
    third = (z.codes % 6) // 2
    assert left[10, 8, 30] and not left[10, 8, 5]  # high x (LPS +x) is the patient's left
    # Each lung is cut into thirds of its own S extent: the right lung spans 30 slices, the left 24.
    assert third[0, 8, 5] == 0 and third[9, 8, 5] == 0 and third[10, 8, 5] == 1 and third[29, 8, 5] == 2
    assert third[6, 8, 30] == 0 and third[13, 8, 30] == 0 and third[14, 8, 30] == 1 and third[29, 8, 30] == 2
    assert z.s_range_mm["right"] == pytest.approx((0.0, 58.0)) and z.s_range_mm["left"] == pytest.approx((12.0, 58.0))


@pytest.mark.parametrize("flip", ["x", "y", "feet-first", "all"])
def test_zones_follow_the_patient_not_the_array(flip):
    """The same physical lungs stored with flipped axes (or feet-first) get the same zones at the same places."""
    spacing = (1.0, 1.0, 2.0)
    mask = two_lungs()
    ref = ex.lung_zones(mask, spacing, (0, 0, 0), IDENTITY, rind_mm=3.0).codes
    d = np.eye(3)
    arr, origin, want = mask, np.zeros(3), ref
    axes = {"x": [0], "y": [1], "feet-first": [2], "all": [0, 1, 2]}[flip]
    for ax in axes:  # ax in (x, y, z) order; array axis is 2 - ax
        n = mask.shape[2 - ax]
        origin = origin + d[:, ax] * spacing[ax] * (n - 1)  # the last voxel becomes voxel 0
        d[:, ax] *= -1
        arr = np.flip(arr, axis=2 - ax)
        want = np.flip(want, axis=2 - ax)
    got = ex.lung_zones(np.ascontiguousarray(arr), spacing, tuple(origin), tuple(d.ravel()), rind_mm=3.0).codes
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("rind_mm", [4.0, 10.0])
def test_subpleural_rind_depth_uses_true_spacing(rind_mm):
    spacing = (1.0, 1.0, 2.0)  # x, y 1 mm; z 2 mm
    m = np.zeros((40, 50, 50), bool)
    m[2:38, 2:48, 2:48] = True
    rind = ex.subpleural_rind(m, spacing, rind_mm)
    # Along x from the lung's edge at x=2: voxel k (0-based) lies (k + 1) mm from the pleura.
    row = rind[20, 25, 2:25]
    assert row.sum() == int(rind_mm)
    # Along z the same depth is half as many slices.
    col = rind[2:20, 25, 25]
    assert col.sum() == int(rind_mm // 2)
    assert not rind[~m].any()


def test_subpleural_rind_matches_scipys_exact_transform():
    # The rind uses the edt package (float32, less memory); it must draw the voxels scipy's exact
    # anisotropic transform draws, on an irregular shape with spacing differing on every axis.
    from scipy import ndimage

    rng = np.random.default_rng(5)
    m = ndimage.binary_opening(ndimage.gaussian_filter(rng.random((30, 40, 50)), 2.0) > 0.5, iterations=1)
    m[:, :, :2] = False  # pleura on one side; the other sides run to the array edge (no rind there)
    spacing = (0.7, 0.9, 2.5)  # x, y, z mm
    depth_mm = ndimage.distance_transform_edt(m, sampling=(2.5, 0.9, 0.7))
    for rind_mm in (2.0, 5.0):
        want = m & (depth_mm <= rind_mm)
        got = ex.subpleural_rind(m, spacing, rind_mm)
        assert want.any() and np.count_nonzero(got != want) == 0


def test_scan_edge_is_not_pleura():
    """A lung cut off by the scan's field of view gets no rind along the cut."""
    m = np.zeros((20, 40, 40), bool)
    m[:, 5:35, 5:35] = True  # touches the first and last slice
    rind = ex.subpleural_rind(m, (1.0, 1.0, 1.0), 3.0)
    assert not rind[0, 20, 20] and not rind[19, 20, 20]
    assert rind[0, 20, 5]


def test_interval_series_rind_and_volumes():
    positions = np.array([0.0, 1.0, 10.0, 11.0, 20.0, 21.0, 30.0, 31.0])
    m = np.zeros((8, 30, 30), bool)
    m[:, 3:27, 3:27] = True
    m[0] = False  # the lung starts at slice 1 (position 1 mm) and stops after the last slice
    spacing = (1.0, 1.0, float(np.mean(np.diff(positions))))
    # Slice 2 (10 mm) lies 10 mm along the normal from non-lung slice 0 at 0 mm: inside a 10 mm rind, not a 9 mm one.
    assert ex.subpleural_rind(m, spacing, 10.0, positions)[2, 15, 15]
    assert not ex.subpleural_rind(m, spacing, 9.0, positions)[2, 15, 15]
    # Volumes: each slice over its own slab, as Scan.mask_volume_ml counts it.
    zones = ex.lung_zones(m, spacing, (0, 0, 0), IDENTITY, positions, 5.0)
    whole = PatchSet(np.arange(8), np.zeros(8, int), np.zeros(8, int), 30, 30, np.ones(8), np.zeros((8, 3)))
    table = ex.zone_volume_table(zones.codes, whole, spacing, 1, slab_thickness_mm(positions))
    scan = Scan(np.zeros(m.shape, np.int16), spacing, (0, 0, 0), IDENTITY, slice_positions_mm=tuple(positions))
    assert table.sum() == pytest.approx(scan.mask_volume_ml(m))
    assert table[-1].sum() == 0  # every lung voxel lies in some box
    # Thirds of the true extent 1..31 mm (cuts at 11 and 21 mm), not of the slice count.
    third = (zones.codes[:, 15, 15] % 6) // 2
    assert list(third[1:]) == [0, 0, 1, 1, 2, 2, 2]


def grid_patches(mask, side=4):
    """Every side x side box of every lung slice (no overlap), like candidate_patches with stride 1."""
    zs, rs, cs = [], [], []
    for z in range(mask.shape[0]):
        for r in range(0, mask.shape[1] - side + 1, side):
            for c in range(0, mask.shape[2] - side + 1, side):
                if mask[z, r:r + side, c:c + side].mean() >= 0.5:
                    zs.append(z), rs.append(r), cs.append(c)
    n = len(zs)
    return PatchSet(np.array(zs), np.array(rs), np.array(cs), side, side, np.ones(n), np.zeros((n, 3)))


def test_extent_by_zone_on_a_known_positive_set():
    spacing = (1.0, 1.0, 2.0)
    mask = two_lungs(nz=30, ny=20, nx=40)
    zones = ex.lung_zones(mask, spacing, (0, 0, 0), IDENTITY, rind_mm=2.0)
    patches = grid_patches(mask)
    table = ex.zone_volume_table(zones.codes, patches, spacing)
    # Positive: every box of the right lung's lowest ten slices (its lower third).
    positive = (patches.col0 < 20) & (patches.slice_index < 10)
    fraction, by_zone, _ = ex.zone_fractions(table, positive)
    assert by_zone["left"] == 0 and by_zone["upper"] == 0 and by_zone["middle"] == 0
    right = table[:-1][:, :6].sum()
    assert by_zone["right"] == pytest.approx(table[:-1][positive][:, :6].sum() / right)
    assert by_zone["lower"] > 0.5
    assert ex.predominance(by_zone).startswith("lower") and "right" in ex.predominance(by_zone)


def test_predominance_lines():
    z = dict(upper=0.02, middle=0.05, lower=0.3, left=0.1, right=0.11, subpleural=0.2, central=0.05)
    assert ex.predominance(z) == "lower, subpleural"
    assert ex.predominance(dict(z, lower=0.06, subpleural=0.06)) == "diffuse"
    assert ex.predominance({k: 0.0 for k in ex.ZONES}) == "none"
    assert ex.predominance(z, lung_fraction=0.02) == "minimal" and ex.predominance(z, lung_fraction=0.1) != "minimal"
    assert ex.predominance(dict(z, upper=0.4, lower=0.02, central=0.3, subpleural=0.1)) == "upper, central"


# ----------------------------------------------------------------------------------------------
# The positive rule on synthetic probability maps
# ----------------------------------------------------------------------------------------------
def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def synthetic_margins(n=2000, diseased=0.0, seed=0):
    rng = np.random.default_rng(seed)
    m = rng.normal(-0.05, 0.02, n)
    sick = np.zeros(n, bool)
    sick[: int(diseased * n)] = True
    m[sick] += 0.12  # six normal SDs: what a model that ranks well gives
    return m, sick


def test_normal_lung_comes_out_low():
    for seed in range(5):
        m, _ = synthetic_margins(seed=seed)
        assert ex.positive_patches(sigmoid(m)).mean() < 0.01


@pytest.mark.parametrize("share", [0.05, 0.15, 0.25])
def test_rule_finds_the_diseased_patches(share):
    m, sick = synthetic_margins(diseased=share, seed=1)
    pos = ex.positive_patches(sigmoid(m))
    assert pos[sick].mean() > 0.9  # recall
    assert (~sick[pos]).mean() < 0.05  # precision: the lower-half spread is not widened by the disease


def test_rule_limit_documented():
    """A finding over most of the scored lung moves the scan's median into it: underestimated, then not seen."""
    found = [ex.positive_patches(sigmoid(synthetic_margins(diseased=s, seed=1)[0])).mean() for s in (0.35, 0.6)]
    assert found[0] < 0.35 and found[1] < 0.05


def test_rule_ranks_scans_like_the_truth():
    shares = [0.0, 0.05, 0.1, 0.2, 0.3]
    found = [ex.positive_patches(sigmoid(synthetic_margins(diseased=s, seed=3)[0])).mean() for s in shares]
    assert np.all(np.diff(found) > 0)


@pytest.mark.parametrize("scale,offset", [(0.3, 0.0), (4.0, 0.0), (1.0, 0.2), (2.0, -0.3)])
def test_rule_does_not_depend_on_the_models_offset_or_spread(scale, offset):
    """Another model (other spread, other text bias) ranking the same way gives the same positives; p > 0.5 does not."""
    m, _ = synthetic_margins(diseased=0.2, seed=2)
    base = ex.positive_patches(sigmoid(m))
    other = sigmoid(scale * m + offset)
    np.testing.assert_array_equal(ex.positive_patches(other), base)


def test_fixed_cut_would_depend_on_the_offset():
    m, _ = synthetic_margins(diseased=0.2, seed=2)
    assert (sigmoid(m + 0.2) > 0.5).mean() > 0.9 and (sigmoid(m) > 0.5).mean() < 0.3


def test_normal_reference_removes_a_normal_scans_own_tail(tmp_path):
    """With a shipped normal-lung reference a patch must also stand out against normal lungs of that model."""
    import json

    # A normal scan scored lower and tighter than normal lungs usually are, with its own upper tail
    # (dense boxes, 4 of its SDs out): positive against the scan alone, ordinary against normal lungs.
    m = np.random.default_rng(4).normal(-0.08, 0.01, 2000)
    m[:40] += 0.04
    alone = ex.positive_patches(sigmoid(m))
    ref = ex.calibrate([sigmoid(synthetic_margins(seed=s)[0]) for s in range(5, 9)])
    assert ref["scans"] == 4 and ref["spread"] == pytest.approx(0.02, rel=0.1)
    both = ex.positive_patches(sigmoid(m), reference=ref)
    assert alone.sum() > 20 and both.sum() < alone.sum() / 4
    sick, truth = synthetic_margins(diseased=0.2, seed=4)
    assert ex.positive_patches(sigmoid(sick), reference=ref)[truth].mean() > 0.95  # disease still found
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"models": {"m": {"finding": ref}}}), encoding="utf-8")
    assert ex.normal_reference("m", "finding", path)["centre"] == ref["centre"]
    assert ex.normal_reference("m", "other", path) is None and ex.normal_reference("x", "finding", path) is None
    assert "model's normal-lung reference" in ex.rule_text(reference=ref)
    assert "model's normal-lung reference" not in ex.rule_text()


def test_shipped_reference_for_the_demo_model():
    ref = ex.normal_reference("phantom-demo", "interstitial lung disease")
    assert ref is not None and ref["spread"] > 0 and ref["scans"] >= 10


def test_constant_scores_give_nothing_positive():
    assert not ex.positive_patches(np.full(50, 0.5)).any()
    assert ex.positive_patches(np.zeros(0)).shape == (0,)


def test_truth_extent_matches_the_mask():
    mask = two_lungs()
    zones = ex.lung_zones(mask, (1.0, 1.0, 2.0), rind_mm=2.0)
    disease = np.zeros_like(mask)
    disease[:10, :, :20] = mask[:10, :, :20]
    fraction, by_zone = ex.truth_extent(zones.codes, disease, (1.0, 1.0, 2.0))
    assert fraction == pytest.approx(disease.sum() / mask.sum())
    assert by_zone["left"] == 0 and by_zone["lower"] == pytest.approx(10 / 18)  # right lower third of both lower thirds


# ----------------------------------------------------------------------------------------------
# End to end with the phantom-trained model
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_extents():
    from ZeroShotILDLib.phantom import generate_phantom
    from ZeroShotILDLib.pipeline import Analyzer
    from ZeroShotILDLib.scan import scan_from_array
    from ZeroShotILDLib.settings import AnalysisSettings

    analyzer = Analyzer(AnalysisSettings(model="phantom-demo", scoring_mode="exact", subtypes=[], patterns=[]))
    out = {}
    for name, kwargs in (("normal", dict(ild=False)), ("ipf", dict(subtype="idiopathic pulmonary fibrosis"))):
        ph = generate_phantom(31, shape_zyx=(48, 128, 128), spacing_mm=(2.5, 2.5, 2.5), **kwargs)
        scan = scan_from_array(ph.hu, ph.spacing_mm, ph.origin_mm, ph.direction, source="phantom")
        out[name] = analyzer.analyze(scan).extent["interstitial lung disease"]
    return out


def test_phantom_normal_lung_low_and_ipf_basal_subpleural(demo_extents):
    normal, ipf = demo_extents["normal"], demo_extents["ipf"]
    assert normal["lung_fraction"] < 0.05
    assert ipf["lung_fraction"] > 2 * normal["lung_fraction"]
    assert ipf["by_zone"]["lower"] > ipf["by_zone"]["upper"]
    assert ipf["by_zone"]["subpleural"] > ipf["by_zone"]["central"]
    assert "robust SD" in ipf["rule"]


def test_interval_series_zone_volumes_match_the_full_scan(tiny_model):
    """An interval copy (1.5 mm slices, gaps 1.5 / 9 mm) measures each zone's lung at its true slice positions."""
    from conftest import tiny_settings
    from ZeroShotILDLib.phantom import generate_phantom
    from ZeroShotILDLib.pipeline import Analyzer

    ph = generate_phantom(5, shape_zyx=(84, 96, 96), spacing_mm=(3.0, 3.0, 1.5), ild=False)
    keep = np.array([k for k in range(ph.hu.shape[0]) if k % 7 in (0, 1)])
    positions = keep * 1.5
    full = Scan(ph.hu, ph.spacing_mm, ph.origin_mm, ph.direction, source="phantom")
    gap = float(np.mean(np.diff(positions)))
    interval = Scan(ph.hu[keep], (3.0, 3.0, gap), ph.origin_mm, ph.direction, source="phantom",
                    slice_positions_mm=tuple(positions))
    settings = tiny_settings(patch_mm=12.0, slice_step_mm=1.0, patterns=[], subtypes=[])
    a = Analyzer(settings, model=tiny_model).analyze(full, lung_mask=ph.lung_mask)
    b = Analyzer(settings, model=tiny_model).analyze(interval, lung_mask=ph.lung_mask[keep])
    for r in (a, b):  # scored + unscored lung is the lung volume, slab by slab
        total = sum(r.zones["scored_lung_ml"][k] for k in ("left", "right")) + r.zones["unscored_lung_ml"]
        assert total == pytest.approx(r.lung_volume_ml, abs=0.05)  # (written to 0.01 mL)
    for zone in ("upper", "middle", "lower", "left", "right", "subpleural", "central"):
        assert b.zones["scored_lung_ml"][zone] == pytest.approx(a.zones["scored_lung_ml"][zone], rel=0.2), zone
    # Counting sampled slices as if evenly spaced would put the cuts elsewhere: the S ranges agree instead.
    for side in ("left", "right"):
        np.testing.assert_allclose(b.zones["s_range_mm"][side], a.zones["s_range_mm"][side], atol=6.0)


def test_feet_first_scan_gets_the_same_extent(small_phantom, tiny_model):
    """The same chest stored feet-first (slice 0 at the top, z direction flipped): identical zones and extent."""
    from conftest import tiny_settings
    from ZeroShotILDLib.pipeline import Analyzer

    ph = small_phantom
    head_first = Scan(ph.hu, ph.spacing_mm, ph.origin_mm, ph.direction, source="phantom")
    d = np.asarray(ph.direction, dtype=float).reshape(3, 3).copy()
    origin = np.asarray(ph.origin_mm) + d[:, 2] * ph.spacing_mm[2] * (ph.hu.shape[0] - 1)
    d[:, 2] *= -1
    feet_first = Scan(np.ascontiguousarray(ph.hu[::-1]), ph.spacing_mm, tuple(origin), tuple(d.ravel()),
                      source="phantom")
    settings = tiny_settings(slice_step_mm=ph.spacing_mm[2], patterns=[], subtypes=[], extent_z=1.0)
    a = Analyzer(settings, model=tiny_model).analyze(head_first, lung_mask=ph.lung_mask)
    b = Analyzer(settings, model=tiny_model).analyze(feet_first, lung_mask=np.ascontiguousarray(ph.lung_mask[::-1]))
    assert a.zones["scored_lung_ml"] == pytest.approx(b.zones["scored_lung_ml"], rel=1e-6)
    ea, eb = a.extent["interstitial lung disease"], b.extent["interstitial lung disease"]
    assert ea["positive_patches"] > 0 and ea["by_zone"]["upper"] != pytest.approx(ea["by_zone"]["lower"], abs=0.01)
    assert eb["by_zone"] == pytest.approx(ea["by_zone"], abs=1e-6) and eb["predominance"] == ea["predominance"]
