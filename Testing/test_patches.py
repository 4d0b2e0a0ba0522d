import numpy as np
import pytest
import torch

from ZeroShotILDLib.geometry import index_to_ras
from ZeroShotILDLib.heatmap import paint_heatmap
from ZeroShotILDLib.montage import build_montage
from ZeroShotILDLib.patches import candidate_patches, patch_pixels, patch_side_px, window_hu
from ZeroShotILDLib.ranking import rank_patches


def _box_mask(shape=(10, 100, 100), box=(2, 8, 20, 80, 10, 90)):
    m = np.zeros(shape, bool)
    z0, z1, y0, y1, x0, x1 = box
    m[z0:z1, y0:y1, x0:x1] = True
    return m


def test_patch_size_in_mm_covers_the_same_anatomy_at_any_spacing():
    assert patch_side_px((0.7, 0.7, 1.0), 32.0) == (46, 46)
    assert patch_side_px((1.4, 1.4, 1.0), 32.0) == (23, 23)
    assert patch_side_px((0.5, 1.0, 1.0), 32.0) == (32, 64)  # rows follow y spacing, cols x spacing
    assert patch_side_px((0.7, 0.7, 1.0), 32.0, patch_px=50) == (50, 50)


def test_candidates_respect_filter_threshold_and_slice_step():
    mask = _box_mask()
    ps = candidate_patches(mask, (1.0, 1.0, 2.0), patch_mm=20, slice_step_mm=4.0, filter_threshold=0.5)
    assert len(ps) > 0
    assert set(np.unique(ps.slice_index)) == {2, 4, 6}  # every 2nd slice from the first lung slice
    for i in range(len(ps)):
        z, r, c = ps.slice_index[i], ps.row0[i], ps.col0[i]
        frac = mask[z, r:r + 20, c:c + 20].mean()
        assert frac == pytest.approx(ps.lung_fraction[i])
        assert frac >= 0.5
    strict = candidate_patches(mask, (1.0, 1.0, 2.0), patch_mm=20, slice_step_mm=4.0, filter_threshold=0.8)
    loose = candidate_patches(mask, (1.0, 1.0, 2.0), patch_mm=20, slice_step_mm=4.0, filter_threshold=0.2)
    assert len(strict) <= len(ps) <= len(loose)
    assert np.all(loose.lung_fraction > 0)


@pytest.mark.parametrize("stride_fraction", [1.0, 0.5, 0.3])
def test_lung_fraction_of_every_box_matches_a_direct_count_on_an_irregular_mask(stride_fraction):
    rng = np.random.default_rng(3)
    mask = rng.random((6, 90, 77)) < 0.6
    mask[:, :5] = False  # lung-free rows: the grid is anchored inside the lungs' bounding box
    ps = candidate_patches(mask, (0.9, 1.1, 1.0), patch_mm=17, stride_fraction=stride_fraction, filter_threshold=0.55)
    assert len(ps) > 0
    direct = [mask[z, r:r + ps.size_rows, c:c + ps.size_cols].mean() for z, r, c in zip(ps.slice_index, ps.row0, ps.col0)]
    np.testing.assert_allclose(ps.lung_fraction, direct, rtol=0, atol=1e-12)
    assert ps.lung_fraction.min() >= 0.55


def test_candidates_stay_inside_the_image_and_centres_are_ras():
    mask = _box_mask(box=(0, 10, 0, 100, 0, 100))
    direction = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    ps = candidate_patches(mask, (0.8, 0.8, 1.5), patch_mm=24, filter_threshold=0.0, origin_mm=(10, 20, 30),
                           direction=direction)
    assert ps.row0.min() >= 0 and (ps.row0 + ps.size_rows).max() <= 100
    i = 0
    centre = [ps.slice_index[i], ps.row0[i] + (ps.size_rows - 1) / 2, ps.col0[i] + (ps.size_cols - 1) / 2]
    lps = np.array([10 + 0.8 * centre[2], 20 + 0.8 * centre[1], 30 + 1.5 * centre[0]])
    np.testing.assert_allclose(ps.center_ras_mm[i], lps * [-1, -1, 1])


def test_index_to_ras_matches_simpleitk_with_oblique_direction():
    import SimpleITK as sitk

    img = sitk.Image(20, 30, 10, sitk.sitkInt16)
    img.SetSpacing((0.7, 0.8, 2.0))
    img.SetOrigin((-100.0, 50.0, 12.5))
    c, s = np.cos(0.3), np.sin(0.3)
    direction = (c, -s, 0, s, c, 0, 0, 0, 1)
    img.SetDirection(direction)
    zyx = np.array([[3.0, 4.5, 7.25], [0, 0, 0]])
    got = index_to_ras(zyx, img.GetSpacing(), img.GetOrigin(), direction)
    for row, (z, y, x) in zip(got, zyx):
        lps = img.TransformContinuousIndexToPhysicalPoint((x, y, z))
        np.testing.assert_allclose(row, [-lps[0], -lps[1], lps[2]], atol=1e-9)


def test_patch_pixels_window_and_resample():
    hu = np.full((3, 40, 40), -1000, np.int16)
    hu[1, 10:20, 10:20] = 150  # top of the lung window -> 1.0
    mask = np.zeros_like(hu, bool)
    mask[1] = True
    ps = candidate_patches(mask, (1.0, 1.0, 1.0), patch_px=10, filter_threshold=0.0)
    target = int(np.flatnonzero((ps.row0 == 10) & (ps.col0 == 10))[0])
    px = patch_pixels(hu, ps, np.array([target, 0]), image_size=32)
    assert px.shape == (2, 1, 32, 32)
    assert torch.allclose(px[0], torch.ones_like(px[0]), atol=1e-5)
    lo = window_hu(torch.tensor([-1000.0]))
    assert 0 < float(lo) < 0.3  # -1000 HU lies inside the lung window, near its bottom


def test_ranking_clip_and_random():
    p = np.array([0.1, 0.9, 0.5, 0.9, 0.2])
    assert list(rank_patches(p, 3, "clip")) == [1, 3, 2]  # ties broken by candidate order
    a = rank_patches(p, 3, "random", seed=4)
    assert list(a) == list(rank_patches(p, 3, "random", seed=4))
    assert len(set(a)) == 3
    assert len(rank_patches(p, 10, "clip")) == 5


@pytest.mark.parametrize("n", [4, 8, 16])
def test_montage_layout(n):
    k = n * n
    pixels = torch.linspace(0, 1, k).view(k, 1, 1, 1).expand(k, 1, 20, 20)
    m = build_montage(pixels, n, 224)
    assert m.shape == (224, 224) and m.dtype == np.uint8
    cell = 224 // n
    # Row-major order: the last cell is the brightest, the first the darkest.
    assert m[cell // 2, cell // 2] == 0
    assert m[(n - 1) * cell + cell // 2, (n - 1) * cell + cell // 2] == 255


def test_montage_with_too_few_patches_leaves_black_cells():
    m = build_montage(torch.ones(3, 1, 8, 8), 4, 64)
    assert m[:16, :48].min() == 255 and m[16:, :].max() == 0


def test_heatmap_paints_boxes_and_slabs():
    mask = _box_mask(shape=(9, 40, 40), box=(0, 9, 0, 40, 0, 40))
    ps = candidate_patches(mask, (1.0, 1.0, 1.0), patch_px=20, slice_step_mm=3.0, filter_threshold=0.0)
    probs = np.linspace(0.1, 0.9, len(ps))
    heat = paint_heatmap(ps, probs, mask.shape, slab_voxels=3)
    i = len(ps) - 1
    z, r, c = ps.slice_index[i], ps.row0[i], ps.col0[i]
    assert heat[z, r + 5, c + 5] == pytest.approx(0.9)
    assert heat[min(z + 1, 8), r + 5, c + 5] == pytest.approx(0.9)  # the slab covers the unscored slice
    assert heat.dtype == np.float32 and heat.min() >= 0
