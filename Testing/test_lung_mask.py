"""Step 2: lung segmentation (paper 000's -400 HU threshold + morphology + hole filling)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import shared_data
from ZeroShotILDLib.errors import Cancelled, InputError
from ZeroShotILDLib.lung_mask import lung_volume_ml, segment_lungs
from ZeroShotILDLib.phantom import generate_phantom
from ZeroShotILDLib.progress import CancelToken
from ZeroShotILDLib.settings import LungMaskSettings

SHAPE = (64, 144, 144)
SPACING = (2.2, 2.2, 3.5)


def dice(a, b) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def cohort():
    kinds = [dict(ild=False), dict(subtype="idiopathic pulmonary fibrosis"),
             dict(subtype="systemic sclerosis"), dict(subtype="hypersensitivity pneumonitis")]
    phantoms = [generate_phantom(40 + i, shape_zyx=SHAPE, spacing_mm=SPACING, **k) for i, k in enumerate(kinds)]
    return [(p, segment_lungs(p.hu, p.spacing_mm)) for p in phantoms]


def test_dice_against_ground_truth_on_normal_and_each_subtype(cohort):
    # The issue's floor is Dice >= 0.95 against the phantoms' ground truth.
    for p, mask in cohort:
        assert mask.dtype == bool and mask.shape == p.hu.shape
        assert dice(mask, p.lung_mask) >= 0.95, p.labels


def test_dense_disease_and_vessels_stay_inside_the_mask(cohort):
    for p, mask in cohort:
        if p.labels["ild"]:
            # Fibrosis and dense ground glass are above -400 HU: hole filling and the rim must keep
            # them. Dense ground glass wider than the rim against the pleura is the known shortfall.
            recall = np.count_nonzero(mask & p.disease_mask) / np.count_nonzero(p.disease_mask)
            assert recall >= 0.8, (p.labels, recall)
        dense_lung = p.lung_mask & (p.hu > -400)  # vessels and dense tissue in the true lung
        kept = np.count_nonzero(mask & dense_lung) / np.count_nonzero(dense_lung)
        assert kept >= 0.8, (p.labels, kept)


def test_trachea_and_main_bronchi_are_removed(cohort):
    for p, mask in cohort:
        airway = p.airway_mask
        assert np.count_nonzero(mask & airway) <= 0.1 * np.count_nonzero(airway)


def test_mediastinum_between_touching_lungs_is_not_filled():
    # Two lungs whose anterior and posterior edges touch enclose the mediastinum in every slice;
    # filling it as a "hole" would add the heart to the lungs.
    z, y, x = np.mgrid[0:24, 0:128, 0:128]
    hu = np.full((24, 128, 128), -1000, np.int16)
    body = ((y - 64) / 56.0) ** 2 + ((x - 64) / 60.0) ** 2 <= 1
    hu[body] = 40
    lungs = ((y - 64) / 40.0) ** 2 + ((x - 64) / 48.0) ** 2 <= 1
    hu[lungs] = -850
    mediastinum = ((y - 64) / 20.0) ** 2 + ((x - 64) / 9.0) ** 2 <= 1  # 18 x 40 px, fully enclosed
    hu[mediastinum] = 40
    mask = segment_lungs(hu, (1.5, 1.5, 5.0))
    # At most the one-pixel partial-volume edge, never the mediastinum's body.
    assert mask[mediastinum].mean() < 0.05
    assert dice(mask, lungs & ~mediastinum) >= 0.95


def test_organ_dome_inside_the_lung_base_is_not_filled_but_a_vessel_is():
    z, y, x = np.mgrid[0:24, 0:128, 0:128]
    hu = np.full((24, 128, 128), -1000, np.int16)
    hu[((y - 64) / 56.0) ** 2 + ((x - 64) / 60.0) ** 2 <= 1] = 40
    right = ((y - 64) / 38.0) ** 2 + ((x - 40) / 20.0) ** 2 <= 1
    left = ((y - 64) / 38.0) ** 2 + ((x - 88) / 20.0) ** 2 <= 1
    hu[right | left] = -850
    dome = (y - 64) ** 2 + (x - 40) ** 2 <= 9 ** 2  # liver top: ~5.7 cm^2 of solid tissue
    vessel = (y - 50) ** 2 + (x - 88) ** 2 <= 2 ** 2
    hu[dome] = 60
    hu[vessel] = 40
    mask = segment_lungs(hu, (1.5, 1.5, 5.0))
    # The dome's edge mixes with lung by partial volume; its body stays out.
    assert mask[dome].mean() < 0.2
    assert mask[vessel].all()


def test_padding_outside_the_field_of_view_is_air():
    p = generate_phantom(44, shape_zyx=SHAPE, spacing_mm=SPACING, ild=False, padding_value=-3024)
    mask = segment_lungs(p.hu, p.spacing_mm)
    assert dice(mask, p.lung_mask) >= 0.95


def test_coarse_working_grid_agrees_with_full_resolution(cohort):
    p, full = cohort[1]
    coarse = segment_lungs(p.hu, p.spacing_mm, working_spacing_mm=2 * SPACING[0])
    assert coarse.shape == full.shape
    # 4.4 mm working pixels on a 144-pixel phantom: edges move by up to a coarse pixel.
    assert dice(coarse, full) >= 0.95


def test_parameters_change_the_result(cohort):
    p, default = cohort[0]
    eroded = segment_lungs(p.hu, p.spacing_mm, LungMaskSettings(erosion_mm=4.0))
    assert np.count_nonzero(eroded) < 0.9 * np.count_nonzero(default)
    assert not (eroded & ~default).any()


def test_volume_in_millilitres():
    mask = np.zeros((10, 10, 10), bool)
    mask[:5] = True  # 500 voxels of 2 x 2 x 2.5 mm = 10 mm^3 each
    assert lung_volume_ml(mask, (2.0, 2.0, 2.5)) == pytest.approx(5.0)


def test_progress_is_reported_and_cancel_stops_the_work():
    p = generate_phantom(45, shape_zyx=(32, 96, 96), spacing_mm=(3.0, 3.0, 5.0), ild=False)
    seen = []
    segment_lungs(p.hu, p.spacing_mm, progress=lambda stage, done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1]
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        segment_lungs(p.hu, p.spacing_mm, cancel=token)


@pytest.mark.parametrize("volume, spacing, words", [
    (np.full((8, 64, 64), 40, np.int16), (1, 1, 1), "no lungs"),                    # solid tissue only
    (np.random.default_rng(0).integers(0, 4000, (8, 64, 64)), (1, 1, 1), "no lungs"),  # MR-like values
    (np.full((64, 64), -800, np.int16), (1, 1, 1), "3-D"),
    (np.full((8, 64, 64), -800, np.int16), (1, 0, 1), "spacing"),
])
def test_bad_input_is_refused_in_one_line(volume, spacing, words):
    with pytest.raises(InputError) as info:
        segment_lungs(volume, spacing)
    message = str(info.value)
    assert words in message and "\n" not in message


def test_scanner_air_alone_is_not_lung():
    # A body with only outside air and bowel gas: no aerated lung.
    z, y, x = np.mgrid[0:16, 0:96, 0:96]
    hu = np.full((16, 96, 96), -1000, np.int16)
    hu[((y - 48) / 40.0) ** 2 + ((x - 48) / 44.0) ** 2 <= 1] = 30
    hu[(y - 48) ** 2 + (x - 40) ** 2 <= 8 ** 2] = -1000  # bowel gas
    with pytest.raises(InputError, match="no lungs"):
        segment_lungs(hu, (2.0, 2.0, 4.0))


@pytest.mark.parametrize("item, min_ml, max_ml", [
    ("totalseg/chest_crop_a.nii.gz", 800, 4000),
    ("totalseg/chest_crop_b.nii.gz", 1200, 5000),
    ("totalseg/abdomen_lung_bases.nii.gz", 20, 800),
    ("osic_ipf_sparse", 2000, 9000),
])
def test_real_ct_lung_volumes_are_plausible(item, min_ml, max_ml):
    from ZeroShotILDLib.scan import read_scan

    scan = read_scan(shared_data("real", "ct", item))
    mask = segment_lungs(scan.hu, scan.spacing_mm)
    volume = lung_volume_ml(mask, scan.spacing_mm)
    assert min_ml <= volume <= max_ml
    # Lung voxels are mostly aerated: the mask did not swallow the mediastinum or chest wall.
    assert np.median(scan.hu[mask]) < -600


def test_real_abdominal_series_without_lungs_is_refused():
    from ZeroShotILDLib.scan import read_scan

    scan = read_scan(shared_data("real", "ct", "totalseg", "abdomen_dicom_series"))
    with pytest.raises(InputError, match="no lungs"):
        segment_lungs(scan.hu, scan.spacing_mm)


def test_per_side_morphology_in_a_box_equals_the_whole_slice(cohort):
    # The per-slice steps run on each side's bounding box plus their reach; that must give the
    # very same pixels as running them on the whole slice (dense SSc bases grow the most).
    from ZeroShotILDLib import lung_mask as lm

    s = LungMaskSettings()
    p = cohort[2][0]
    samp = (p.spacing_mm[1], p.spacing_mm[0])
    small = lm.SMALL_HOLE_CM2 * 100.0 / (samp[0] * samp[1])
    large = lm.MAX_HOLE_CM2 * 100.0 / (samp[0] * samp[1])
    margin = int(np.ceil(max(s.closing_mm, lm.RIM_MM, lm.DENSE_GROW_MM, lm.RIM_WINDOW_MM) / min(samp))) + 3
    aerated = p.hu < s.threshold_hu
    checked = 0
    for z in np.linspace(0, p.hu.shape[0] - 1, 9).astype(int):
        part = np.pad(aerated[z] & p.lung_mask[z], ((0, 0), (0, 1)))
        if not part.any():
            continue
        hu = np.pad(p.hu[z], ((0, 0), (0, 1)))
        whole = lm._side_morphology(part, hu, None, s, samp, small, large)
        boxed = lm._in_box(part, margin, lambda a, h, w: lm._side_morphology(a, h, w, s, samp, small, large), hu, None)
        np.testing.assert_array_equal(boxed, whole)
        checked += 1
    assert checked >= 5
    # The distance transform keeps scipy's meaning: the image edge is not background, and a
    # slice without background is infinitely far from it.
    from scipy import ndimage as ndi

    m = np.zeros((20, 30), bool)
    m[3:20, 5:25] = True
    np.testing.assert_allclose(lm._distance_mm(m, (0.7, 0.9)), ndi.distance_transform_edt(m, sampling=(0.7, 0.9)),
                               rtol=1e-5, atol=1e-5)
    assert np.isinf(lm._distance_mm(np.ones((4, 4), bool), (1.0, 1.0))).all()


def test_threaded_per_slice_morphology_equals_one_thread(cohort, monkeypatch):
    # The per-slice steps run on a thread pool; each slice writes only its own plane, so the mask
    # must not depend on how many threads ran or in which order they finished.
    from ZeroShotILDLib import lung_mask as lm

    p, threaded = cohort[1]
    assert lm.worker_threads() >= 1
    monkeypatch.setattr(lm, "worker_threads", lambda: 1)
    np.testing.assert_array_equal(segment_lungs(p.hu, p.spacing_mm), threaded)
    monkeypatch.setattr(lm, "worker_threads", lambda: 3)
    np.testing.assert_array_equal(segment_lungs(p.hu, p.spacing_mm), threaded)


def test_worker_threads_follow_omp_num_threads(monkeypatch):
    from ZeroShotILDLib.lung_mask import MAX_WORKER_THREADS, worker_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert worker_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert 1 <= worker_threads() <= MAX_WORKER_THREADS
