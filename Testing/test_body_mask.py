"""The body mask that keeps the lung mask inside the patient (issue 15): any table, position, orientation.

The lung mask's candidates are restricted to the body, found from the patient (not from the array's
borders or a table position). These tests put a full-width table (foam core of lung-like density,
as real tables have) under a supine or over a prone phantom, store the array in each of the eight
in-plane flips/rotations, re-write the real CTs in those orientations (array and direction cosines
together, so the patient stays where it is), add a synthetic table and low-dose noise to the real
CTs, and segment expiratory phantoms.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import shared_data
from ZeroShotILDLib.lung_mask import lung_volume_ml, segment_body, segment_lungs
from ZeroShotILDLib.phantom import add_full_width_table, generate_phantom

SHAPE = (40, 128, 128)
SPACING = (2.5, 2.5, 5.0)
#: (transpose y/x, flip y, flip x): the eight in-plane orientations an array can be stored in.
ORIENTATIONS = [(bool(k & 4), bool(k & 2), bool(k & 1)) for k in range(8)]
REAL = ["totalseg/chest_crop_a.nii.gz", "totalseg/chest_crop_b.nii.gz", "osic_ipf_sparse"]


def dice(a, b) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def reorient(hu, spacing_mm, origin_mm, direction, transpose, flip_y, flip_x):
    """The same volume stored another way: (array, spacing, origin, direction) in the same patient space."""
    d = np.array(direction, dtype=float).reshape(3, 3)  # column j: direction of index axis j (x, y, z)
    origin = np.array(origin_mm, dtype=float)
    spacing = list(spacing_mm)
    a = np.asarray(hu)
    if transpose:
        a = a.transpose(0, 2, 1)
        d = d[:, [1, 0, 2]]
        spacing = [spacing[1], spacing[0], spacing[2]]
    for axis, flip in ((1, flip_y), (2, flip_x)):
        if flip:
            col = 2 - axis
            origin = origin + d[:, col] * spacing[col] * (a.shape[axis] - 1)
            d[:, col] = -d[:, col]
            a = np.flip(a, axis=axis)
    return np.ascontiguousarray(a), tuple(spacing), tuple(origin), tuple(d.ravel())


def restore(mask, transpose, flip_y, flip_x):
    """Undo ``reorient`` on a mask computed on the re-stored array."""
    if flip_x:
        mask = np.flip(mask, 2)
    if flip_y:
        mask = np.flip(mask, 1)
    if transpose:
        mask = mask.transpose(0, 2, 1)
    return np.ascontiguousarray(mask)


# ----------------------------------------------------------------------------------------------
# Phantoms with a full-width table
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_dice():
    """Dice of the mask against the truth on the same chest with the default (narrow, curved) table."""
    p = generate_phantom(21, shape_zyx=SHAPE, spacing_mm=SPACING, ild=False)
    return dice(segment_lungs(p.hu, p.spacing_mm), p.lung_mask)


@pytest.mark.parametrize("position, gap_mm", [("supine", None), ("prone", None), ("supine", 0.0), ("prone", 0.0)])
def test_full_width_table_never_enters_the_mask_in_any_orientation(position, gap_mm, reference_dice):
    p = generate_phantom(21, shape_zyx=SHAPE, spacing_mm=SPACING, ild=False, table="full",
                         position=position, table_gap_mm=gap_mm)
    table = (p.hu > -990) & ~p.body_mask  # shells and lung-dense foam core, outside the skin
    assert table.any()
    for t, fy, fx in ORIENTATIONS:
        hu, spacing, _, _ = reorient(p.hu, p.spacing_mm, p.origin_mm, p.direction, t, fy, fx)
        mask = restore(segment_lungs(hu, spacing), t, fy, fx)
        assert not (mask & ~p.body_mask).any(), (position, gap_mm, t, fy, fx)
        # The same Dice as with the narrow table (the table only ever adds outside voxels).
        assert dice(mask, p.lung_mask) >= min(0.95, reference_dice - 0.01), (position, t, fy, fx)


def test_body_mask_is_the_patient_not_the_table():
    p = generate_phantom(22, shape_zyx=SHAPE, spacing_mm=SPACING, ild=True, table="full", position="prone",
                         table_gap_mm=0.0, padding_value=-3024)
    body = segment_body(p.hu, p.spacing_mm)
    assert body.shape == p.hu.shape and body.dtype == bool
    assert dice(body, np.asarray(p.body_mask)) >= 0.97
    assert body[p.lung_mask].all()  # the lungs touch the chest wall, yet are always inside
    table = (p.hu > -990) & ~p.body_mask
    assert np.count_nonzero(body & table) <= 0.02 * np.count_nonzero(table)


@pytest.mark.parametrize("volume, spacing, words", [
    (np.full((64, 64), -800, np.int16), (1, 1, 1), "3-D"),
    (np.full((4, 64, 64), -800, np.int16), (1, 0, 1), "spacing"),
])
def test_body_mask_refuses_bad_input_in_one_line(volume, spacing, words):
    from ZeroShotILDLib.errors import InputError

    with pytest.raises(InputError, match=words) as info:
        segment_body(volume, spacing)
    assert "\n" not in str(info.value)


def test_direction_must_have_nine_values():
    from ZeroShotILDLib.errors import InputError

    p = generate_phantom(26, shape_zyx=(12, 64, 64), spacing_mm=(5.0, 5.0, 10.0), ild=False)
    with pytest.raises(InputError, match="direction"):
        segment_lungs(p.hu, p.spacing_mm, direction=(1.0, 0.0, 0.0))
    # The identity (and any direction with left-right columns) changes nothing.
    np.testing.assert_array_equal(segment_lungs(p.hu, p.spacing_mm, direction=p.direction),
                                  segment_lungs(p.hu, p.spacing_mm))


def test_body_mask_of_air_alone_is_empty():
    assert not segment_body(np.full((4, 32, 32), -1000, np.int16), (2.0, 2.0, 2.0)).any()


def test_lateral_table_touching_the_body():
    # A decubitus patient: the table against the side of the chest (a transposed supine phantom
    # with the table moved to touch the skin).
    p = generate_phantom(23, shape_zyx=SHAPE, spacing_mm=SPACING, ild=False, table="full", table_gap_mm=0.0)
    hu, spacing, _, _ = reorient(p.hu, p.spacing_mm, p.origin_mm, p.direction, True, False, True)
    mask = restore(segment_lungs(hu, spacing), True, False, True)
    assert not (mask & ~p.body_mask).any()
    assert dice(mask, p.lung_mask) >= 0.95


def test_lungs_cut_by_a_tight_crop_stay_inside_the_body():
    # A crop through the lungs on every in-plane side: the lungs reach the image edge, so they
    # are not holes of the body; they stay in because they are denser than gas and the body
    # bounds them everywhere else.
    p = generate_phantom(25, shape_zyx=SHAPE, spacing_mm=SPACING, ild=False, table="full")
    ys = np.flatnonzero(p.lung_mask.any(axis=(0, 2)))
    xs = np.flatnonzero(p.lung_mask.any(axis=(0, 1)))
    cut = (slice(None), slice(ys[0] + 6, ys[-1] - 5), slice(xs[0] + 6, xs[-1] - 5))
    hu, truth = np.ascontiguousarray(p.hu[cut]), p.lung_mask[cut]
    assert truth[:, 0, :].any() and truth[:, :, 0].any() and truth[:, :, -1].any()
    assert segment_body(hu, p.spacing_mm)[truth].all()
    assert dice(segment_lungs(hu, p.spacing_mm), truth) >= 0.95


# ----------------------------------------------------------------------------------------------
# Expiratory and low-dose# ----------------------------------------------------------------------------------------------
# Expiratory and low-dose
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lung_hu, noise_hu", [(-650.0, 20.0), (-700.0, 20.0), (-650.0, 80.0), (None, 80.0)])
def test_expiratory_and_low_dose_phantoms(lung_hu, noise_hu):
    # Expiration lifts the lungs to about -650..-700 HU, still well below the -400 HU threshold;
    # 80 HU of noise (low dose) puts single voxels across it. The floor is the project's 0.95
    # against ground truth (measured: 0.98-0.99, README).
    p = generate_phantom(24, shape_zyx=SHAPE, spacing_mm=SPACING, subtype="idiopathic pulmonary fibrosis",
                         table="full", lung_hu=lung_hu, noise_hu=noise_hu)
    mask = segment_lungs(p.hu, p.spacing_mm)
    assert dice(mask, p.lung_mask) >= 0.95, (lung_hu, noise_hu)
    assert not (mask & ~p.body_mask).any()


# ----------------------------------------------------------------------------------------------
# Real CTs
# ----------------------------------------------------------------------------------------------
_REAL_CACHE = {}


def _real(item):
    if item not in _REAL_CACHE:
        from ZeroShotILDLib.scan import read_scan

        scan = read_scan(shared_data("real", "ct", item))
        _REAL_CACHE[item] = (scan, segment_lungs(scan.hu, scan.spacing_mm))
    return _REAL_CACHE[item]


@pytest.mark.parametrize("item", REAL)
def test_real_ct_in_every_in_plane_orientation(item):
    import SimpleITK as sitk

    from ZeroShotILDLib.scan import scan_from_sitk

    scan, reference = _real(item)
    corner = (scan.hu.shape[2] - 1, 0, scan.hu.shape[0] // 2)  # voxel (x, y, z) of the original
    original = scan.to_sitk().TransformIndexToPhysicalPoint(corner)
    for t, fy, fx in ORIENTATIONS:
        hu, spacing, origin, direction = reorient(scan.hu, scan.spacing_mm, scan.origin_mm, scan.direction, t, fy, fx)
        image = sitk.GetImageFromArray(hu)
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(direction)
        stored = scan_from_sitk(image, source=item)
        # The patient did not move: the original corner voxel is at the same place in the new array.
        x, y, z = corner
        i = np.array([z, y, x])
        if t:
            i = i[[0, 2, 1]]
        if fy:
            i[1] = hu.shape[1] - 1 - i[1]
        if fx:
            i[2] = hu.shape[2] - 1 - i[2]
        moved = image.TransformIndexToPhysicalPoint((int(i[2]), int(i[1]), int(i[0])))
        np.testing.assert_allclose(moved, original, atol=1e-3)
        mask = restore(segment_lungs(stored.hu, stored.spacing_mm), t, fy, fx)
        assert dice(mask, reference) >= 0.99, (item, t, fy, fx)
        if t:
            # Given the direction cosines, a transposed array is segmented upright: the same mask
            # up to the flips (the lungs split left/right as in the original).
            upright = restore(segment_lungs(stored.hu, stored.spacing_mm, direction=stored.direction), t, fy, fx)
            assert dice(upright, reference) >= 0.998, (item, t, fy, fx)


@pytest.mark.parametrize("side, gap_mm", [("below", 8.0), ("below", 0.0), ("above", 0.0)])
def test_real_ct_with_a_full_width_table(side, gap_mm):
    # The IPF case (body inside the field of view): a table as wide as the field of view below
    # the back (supine) or against the chest (prone), with or without an air gap.
    scan, reference = _real("osic_ipf_sparse")
    body = segment_body(scan.hu, scan.spacing_mm)
    hu, table = add_full_width_table(scan.hu, scan.spacing_mm, body, side=side, gap_mm=gap_mm)
    mask = segment_lungs(hu, scan.spacing_mm)
    assert not (mask & table).any()
    before = lung_volume_ml(reference, scan.spacing_mm)
    assert abs(lung_volume_ml(mask, scan.spacing_mm) - before) <= 0.02 * before
    assert dice(mask, reference) >= 0.99


@pytest.mark.parametrize("item", REAL)
@pytest.mark.parametrize("sigma_hu", [40.0, 80.0])
def test_real_ct_with_low_dose_noise(item, sigma_hu):
    # White Gaussian noise, clipped at -1024 HU as scanners store it. Measured Dice against the
    # clean scan's mask: crops 0.995-0.998, IPF 0.98 (README); the floor is the project's 0.95.
    scan, reference = _real(item)
    rng = np.random.default_rng(int(sigma_hu))
    noisy = np.clip(scan.hu + rng.normal(0.0, sigma_hu, scan.hu.shape), -1024, 3071).astype(np.int16)
    mask = segment_lungs(noisy, scan.spacing_mm)
    assert dice(mask, reference) >= 0.95, (item, sigma_hu)


def test_real_mattress_pressed_between_body_and_image_edge_is_not_lung():
    # The abdomen CT lies on a mattress that, in the pelvic slices, is pressed between the body
    # and the image edge (lung-like foam bounded by the body and the edge, like a cropped lung);
    # in other slices it joins the air outside the body, so it is outside. Lungs: 129 mL of bases
    # (329 mL when the mattress was taken as cropped lung).
    from ZeroShotILDLib.scan import read_scan

    scan = read_scan(shared_data("real", "ct", "totalseg", "abdomen_lung_bases.nii.gz"))
    mask = segment_lungs(scan.hu, scan.spacing_mm)
    assert lung_volume_ml(mask, scan.spacing_mm) <= 160
    assert not mask[:40].any()  # the pelvis
