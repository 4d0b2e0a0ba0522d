"""Extent (issue 14): zones in patient coordinates, the subpleural rind, interval-series volumes, the positive rule."""
import numpy as np
import pytest

from ZeroShotILDLib import calibration
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
    m[0] = False  # the lung starts at slice 1 (position 1 mm) and ends in a taper on the last slice
    m[-1] = False
    m[-1, 14:16, 14:16] = True
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
    assert ex.distribution(by_zone).startswith("lower") and "right" in ex.distribution(by_zone)


# ----------------------------------------------------------------------------------------------
# The positive rule on synthetic contrast maps, 0 to 100 % involvement
# ----------------------------------------------------------------------------------------------
def synthetic_contrasts(n=2000, diseased=0.0, seed=0, offset=-0.05, sd=0.02, shift=0.12):
    """Patch contrasts of one scan: normal boxes ~ N(offset, sd), diseased ones ``shift`` higher (six normal SDs:
    what a model that tells disease from normal lung gives). The first ``diseased`` share is diseased."""
    rng = np.random.default_rng(seed)
    c = rng.normal(offset, sd, n)
    sick = np.zeros(n, bool)
    sick[: int(round(diseased * n))] = True
    c[sick] += shift
    return c, sick


def normal_reference(seeds=range(5, 9), **kwargs):
    return calibration.build_reference([synthetic_contrasts(seed=s, **kwargs)[0] for s in seeds])


def test_normal_lung_comes_out_low():
    ref = normal_reference()
    for seed in range(5):
        c, _ = synthetic_contrasts(seed=seed)
        assert ex.positive_patches(c, reference=ref).mean() < 0.01


@pytest.mark.parametrize("share", [0.05, 0.15, 0.4, 0.6, 0.8, 1.0])
def test_rule_finds_the_diseased_patches_at_any_involvement(share):
    """The reference is the normal lungs', not the scan's own: a lung 60-100 % involved reads 60-100 %."""
    c, sick = synthetic_contrasts(diseased=share, seed=1)
    pos = ex.positive_patches(c, reference=normal_reference())
    assert pos[sick].mean() > 0.95  # recall
    assert pos.mean() == pytest.approx(share, abs=0.03)


def test_rule_ranks_scans_like_the_truth_over_the_whole_range():
    shares = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]
    ref = normal_reference()
    found = [ex.positive_patches(synthetic_contrasts(diseased=s, seed=3)[0], reference=ref).mean() for s in shares]
    assert np.all(np.diff(found) > 0)


@pytest.mark.parametrize("scale,offset", [(0.3, 0.0), (4.0, 0.0), (1.0, 0.2), (2.0, -0.3)])
def test_rule_does_not_depend_on_the_models_offset_or_spread(scale, offset):
    """Another model (other spread, other text bias) ranking the same way, calibrated on its own normals, gives
    the same positives."""
    c, _ = synthetic_contrasts(diseased=0.3, seed=2)
    base = ex.positive_patches(c, reference=normal_reference())
    other_ref = calibration.build_reference([scale * synthetic_contrasts(seed=s)[0] + offset for s in range(5, 9)])
    np.testing.assert_array_equal(ex.positive_patches(scale * c + offset, reference=other_ref), base)


def test_uncalibrated_rule_is_the_text_contrast_and_never_reads_zero_when_most_is_abnormal():
    """Without a reference: closer to the finding than to normal lung. A lung mostly scoring abnormal reads high."""
    c, sick = synthetic_contrasts(diseased=0.8, seed=2, offset=-0.03)
    pos = ex.positive_patches(c)
    assert pos.mean() > 0.75 and pos[sick].mean() > 0.99
    np.testing.assert_array_equal(pos, c > 0)
    text = ex.rule_text("honeycombing", "normal lung")
    assert "UNCALIBRATED" in text and "zeroshot-ild calibrate" in text


def test_constant_scores_give_nothing_positive():
    ref = normal_reference()
    assert not ex.positive_patches(np.full(50, ref["centre"]), reference=ref).any()
    assert ex.positive_patches(np.zeros(0), reference=ref).shape == (0,)
    with pytest.raises(Exception, match="same"):
        calibration.build_reference([np.zeros(500)])


def test_reference_files_belong_to_their_weights(tmp_path):
    """Stored beside the weights with their SHA-256 and normal text; other weights or text: ignored, with a note."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    ref = normal_reference()
    path = calibration.write_references(weights, "a" * 64, "m", "normal lung", {"honeycombing": ref},
                                        {"patch_mm": 32.0}, made_by="test")
    assert path == tmp_path / "model.safetensors.extent-reference.json"
    found, note = calibration.load_references(weights, "a" * 64, ["honeycombing", "other"], "normal lung")
    assert found["honeycombing"]["centre"] == pytest.approx(ref["centre"]) and found["other"] is None and not note
    assert found["honeycombing"]["weights_sha256"] == "a" * 64 and found["honeycombing"]["scans"] == 4
    found, note = calibration.load_references(weights, "b" * 64, ["honeycombing"], "normal lung")
    assert found["honeycombing"] is None and "other weights" in note
    found, note = calibration.load_references(weights, "a" * 64, ["honeycombing"], "healthy lung")
    assert found["honeycombing"] is None and "normal lung" in note
    # A second calibration adds prompts for the same weights; new weights replace the file.
    calibration.write_references(weights, "a" * 64, "m", "normal lung", {"reticulation": ref}, {})
    found, _ = calibration.load_references(weights, "a" * 64, ["honeycombing", "reticulation"], "normal lung")
    assert all(found.values())
    calibration.write_references(weights, "c" * 64, "m", "normal lung", {"reticulation": ref}, {})
    found, _ = calibration.load_references(weights, "c" * 64, ["honeycombing", "reticulation"], "normal lung")
    assert found["honeycombing"] is None and found["reticulation"] is not None
    # Made with other patch settings (a 24 mm box scores otherwise than a 32 mm one): ignored, with a note.
    calibration.write_references(weights, "c" * 64, "m", "normal lung", {"reticulation": ref},
                                 {"patch_mm": 32.0, "hu_window": [-1350.0, 150.0]})
    found, note = calibration.load_references(weights, "c" * 64, ["reticulation"], "normal lung",
                                              {"patch_mm": 24.0, "hu_window": (-1350.0, 150.0)})
    assert found["reticulation"] is None and "other patch settings" in note
    found, note = calibration.load_references(weights, "c" * 64, ["reticulation"], "normal lung",
                                              {"patch_mm": 32.0, "hu_window": (-1350, 150)})
    assert found["reticulation"] is not None and not note
    path.write_text("{not json", encoding="utf-8")
    assert calibration.load_references(weights, "c" * 64, ["x"], "normal lung") == ({"x": None}, "")


def test_summary_words_follow_the_zone_figures():
    """Severity from the whole lung, then the zones named by the stated rule: the headline never contradicts
    the chart (lower 11.9 % vs upper 0.5 % is 'lower' even when the whole lung is 'minimal')."""
    z = dict(upper=0.005, middle=0.02, lower=0.119, left=0.04, right=0.05, subpleural=0.06, central=0.03)
    assert ex.predominance(z, 0.04) == "minimal, lower, subpleural"
    assert ex.severity(0.0) == "none" and ex.severity(0.1) == "limited" and ex.severity(0.7) == "extensive"
    z = dict(upper=0.02, middle=0.05, lower=0.3, left=0.1, right=0.11, subpleural=0.2, central=0.05)
    assert ex.predominance(z, 0.15) == "limited, lower, subpleural"
    assert ex.predominance(dict(z, lower=0.06, subpleural=0.06), 0.06) == "limited, diffuse"
    assert ex.predominance({k: 0.0 for k in ex.ZONES}, 0.0) == "none"
    assert ex.predominance(dict(z, upper=0.4, lower=0.02, central=0.3, subpleural=0.1), 0.25) == "extensive, upper, central"
    # Zones under 5 % of their lung are not named, however lopsided.
    assert ex.distribution(dict(upper=0.0, middle=0.0, lower=0.03, left=0.01, right=0.01, subpleural=0.01,
                                central=0.01)) == "diffuse"
    # A third that was not imaged takes no part.
    assert ex.distribution(dict(z, upper=float("nan")), not_imaged=["upper"]) == "lower, subpleural"


def test_whole_lung_denominator_and_scored_share():
    """Lung in no scored box counts in the denominator (and as not positive); the scored share says how much."""
    spacing = (1.0, 1.0, 2.0)
    mask = two_lungs()
    zones = ex.lung_zones(mask, spacing, (0, 0, 0), IDENTITY, rind_mm=2.0)
    patches = grid_patches(mask)
    patches = patches.subset(np.arange(len(patches)) % 5 != 0)  # a fifth of the lung in no scored box
    table = ex.zone_volume_table(zones.codes, patches, spacing)
    everything = np.ones(len(patches), bool)
    share, by_zone = ex.scored_share(table)
    fraction = ex.zone_fractions(table, everything)[0]
    assert fraction == pytest.approx(share) and share < 1.0
    record = ex.extent_summary(table, everything, "rule")
    assert record["scored_share"] == pytest.approx(share) and record["lung_fraction"] == pytest.approx(share)
    assert record["positive_ml"]["left"] + record["positive_ml"]["right"] == pytest.approx(table[:-1].sum(), abs=0.02)


def test_extents_for_marks_calibration_and_provenance():
    spacing = (1.0, 1.0, 2.0)
    mask = two_lungs()
    zones = ex.lung_zones(mask, spacing, (0, 0, 0), IDENTITY, rind_mm=2.0)
    patches = grid_patches(mask)
    table = ex.zone_volume_table(zones.codes, patches, spacing)
    c, _ = synthetic_contrasts(len(patches), diseased=0.5, seed=3)
    ref = dict(normal_reference(), weights_sha256="d" * 64)
    out = ex.extents_for(table, {"a": c, "b": c}, ["a", "b"], "normal lung", references={"a": ref, "b": None})
    assert out["a"]["calibrated"] and out["a"]["reference"]["weights_sha256"] == "d" * 64
    assert "robust standard deviations" in out["a"]["rule"] and "normal scans" in out["a"]["rule"]
    assert not out["b"]["calibrated"] and "UNCALIBRATED" in out["b"]["rule"] and "reference" not in out["b"]


# ----------------------------------------------------------------------------------------------
# Lungs imaged in part
# ----------------------------------------------------------------------------------------------
def test_lung_bases_only_are_not_called_upper():
    """A scan of the bases (lungs cut off by the top slice) has no upper zone; it is reported as not imaged."""
    m = np.zeros((20, 30, 40), bool)
    for z in range(20):  # the lungs widen upwards and end in the top slice at full width
        half = z // 2
        m[z, 5:25, 10 - min(half, 9):10 + min(half, 9)] = True
        m[z, 5:25, 30 - min(half, 9):30 + min(half, 9)] = True
    spacing = (1.5, 1.5, 3.0)
    zones = ex.lung_zones(m, spacing, (0, 0, 0), IDENTITY, rind_mm=3.0)
    assert zones.coverage["cut"] == ["superior"] and not zones.coverage["complete"]
    assert "upper" in zones.coverage["not_imaged"] and "lower" not in zones.coverage["not_imaged"]
    assert "incompletely imaged" in zones.coverage["note"]
    table = ex.zone_volume_table(zones.codes, grid_patches(m), spacing)
    record = ex.extent_summary(table, np.ones(len(grid_patches(m)), bool), "rule", coverage=zones.coverage)
    assert "upper" in record["not_imaged"] and record["by_zone"]["upper"] is None  # no figure, never 0 %
    assert "upper" not in record["predominance"]
    # Feet-first storage of the same scan: the superior end is found from the geometry, not the array order.
    d = np.diag([1.0, 1.0, -1.0]).ravel()
    flipped = ex.imaging_coverage(m[::-1], spacing, (0, 0, 57.0), tuple(d))
    assert flipped["cut"] == ["superior"]
    # Lungs cut at both ends: no third can be placed.
    both = np.zeros((10, 30, 40), bool)
    both[:, 5:25, 2:18] = True
    both[:, 5:25, 22:38] = True
    z2 = ex.lung_zones(both, spacing, (0, 0, 0), IDENTITY, rind_mm=3.0)
    assert z2.coverage["cut"] == ["superior", "inferior"] and z2.coverage["thirds_anatomical"] is False


def test_whole_lungs_are_complete():
    m = np.zeros((20, 30, 40), bool)
    for z in range(2, 18):
        half = min(z - 1, 18 - z, 6)
        m[z, 5:25, 10 - half:10 + half] = True
        m[z, 5:25, 30 - half:30 + half] = True
    assert ex.imaging_coverage(m, (1.0, 1.0, 2.0))["complete"]


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
    assert ipf["calibrated"] and normal["calibrated"] and "robust standard deviations" in ipf["rule"]


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
    a, b = Analyzer(settings, model=tiny_model), Analyzer(settings, model=tiny_model)
    # Random weights have no normal-lung reference: one from the head-first scan's own contrasts serves both.
    a.analyze(head_first, lung_mask=ph.lung_mask)
    ref = calibration.build_reference([a.contrast_scores(settings.prompts)[settings.prompts[0]]])
    for analyzer in (a, b):
        analyzer.references = lambda prompts: ({p: ref for p in prompts}, "")
    a = a.reprompt()
    b = b.analyze(feet_first, lung_mask=np.ascontiguousarray(ph.lung_mask[::-1]))
    assert a.zones["scored_lung_ml"] == pytest.approx(b.zones["scored_lung_ml"], rel=1e-6)
    ea, eb = a.extent["interstitial lung disease"], b.extent["interstitial lung disease"]
    assert ea["positive_patches"] > 0 and ea["by_zone"]["upper"] != pytest.approx(ea["by_zone"]["lower"], abs=0.01)
    assert eb["by_zone"] == pytest.approx(ea["by_zone"], abs=1e-6) and eb["predominance"] == ea["predominance"]


def test_a_finding_is_a_region_isolated_boxes_do_not_count():
    """Box neighbours on the shared grid (any stride), and the region rule: a positive box needs positive
    neighbours; a block of disease keeps its inner boxes, scattered single boxes are dropped."""
    zs, rs, cs = np.meshgrid(np.arange(0, 10, 2), np.arange(0, 40, 8), np.arange(0, 40, 8), indexing="ij")
    zs, rs, cs = zs.ravel(), rs.ravel(), cs.ravel()
    nb = ex.box_neighbours(zs, rs, cs)
    i = int(np.flatnonzero((zs == 4) & (rs == 16) & (cs == 16))[0])
    expect = {(2, 16, 16), (6, 16, 16), (4, 8, 16), (4, 24, 16), (4, 16, 8), (4, 16, 24)}
    assert {(int(zs[j]), int(rs[j]), int(cs[j])) for j in nb[i]} == expect
    corner = int(np.flatnonzero((zs == 0) & (rs == 0) & (cs == 0))[0])
    assert (nb[corner] == -1).sum() == 3
    block = (zs <= 4) & (rs <= 16) & (cs <= 16)  # a 3 x 3 x 3 region of disease
    stray = (zs == 8) & (rs == 32) & (cs == 32)  # one box far from it
    kept = ex.supported(block | stray, nb, 2)
    assert kept[block].all() and not kept[stray].any()
    assert ex.supported(block | stray, nb, 0).sum() == (block | stray).sum()
    assert ex.supported(block | stray, None, 2).sum() == (block | stray).sum()
    assert ex.box_neighbours(np.zeros(0, int), np.zeros(0, int), np.zeros(0, int)).shape == (0, 6)


def test_a_pattern_counts_where_it_beats_its_negation_and_co_existing_patterns_both_count():
    """Disease boxes look unlike normal lung for every pattern prompt; each pattern keeps the boxes nearer its
    text than "no <pattern>", so a ground-glass region is not also read as honeycombing, while a fibrotic box
    holding reticulation *and* honeycombing counts for both (the earlier nearest-pattern rule gave it to one)."""
    mask = two_lungs()
    spacing = (1.0, 1.0, 2.0)
    zones = ex.lung_zones(mask, spacing, (0, 0, 0), IDENTITY, rind_mm=2.0)
    patches = grid_patches(mask)
    table = ex.zone_volume_table(zones.codes, patches, spacing)
    n = len(patches)
    honey, ggo, both = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
    honey[: n // 6], ggo[n // 6: n // 3], both[n // 3: n // 2] = True, True, True
    rng = np.random.default_rng(0)
    base = rng.normal(-0.05, 0.01, n)
    sick = honey | ggo | both
    scores = {"honeycombing": base + 0.10 * sick, "reticulation": base + 0.10 * sick,
              "ground-glass opacity": base + 0.10 * sick}          # every disease unlike normal lung
    says = {"honeycombing": honey | both, "reticulation": both, "ground-glass opacity": ggo}
    negations = {k: (f"no {k}", np.where(says[k], 0.02, -0.02) + rng.normal(0, 0.002, n)) for k in scores}
    ref = normal_reference(offset=-0.05, sd=0.01)
    refs = {k: ref for k in scores}
    alone = ex.extents_for(table, scores, list(scores), "normal lung", z=3.0, references=refs)
    gated = ex.extents_for(table, scores, list(scores), "normal lung", z=3.0, references=refs, negations=negations)
    assert alone["honeycombing"]["positive_patches"] == pytest.approx(sick.sum(), abs=2)  # reads all disease
    for k in scores:
        assert gated[k]["positive_patches"] == pytest.approx(says[k].sum(), abs=2), k
    # one word, one number: the same word asked alone or beside others gets the same extent
    one = ex.extents_for(table, scores, ["reticulation"], "normal lung", z=3.0, references=refs, negations=negations)
    assert one["reticulation"]["lung_fraction"] == gated["reticulation"]["lung_fraction"]
    assert "'no honeycombing'" in gated["honeycombing"]["rule"] and "no honeycombing" not in alone["honeycombing"]["rule"]
