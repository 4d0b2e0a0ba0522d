"""Interval HRCT (issue 15): thin slices with uneven gaps are analysed where they were acquired.

The classic ILD protocol keeps thin slices with gaps that alternate (1 mm then 9 mm). Each test
builds such a series by dropping slices from an evenly spaced CT (a phantom here, the real CTs in
../shared when present) and writing the rest as DICOM slices, then compares against the full scan
at the kept slices' true positions: the lung mask, the lung volume, the patch centres in patient
space and the NIfTI outputs written on a regular grid.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared_data, tiny_settings
from ZeroShotILDLib import geometry
from ZeroShotILDLib.lung_mask import segment_lungs
from ZeroShotILDLib.patches import candidate_patches
from ZeroShotILDLib.phantom import generate_phantom
from ZeroShotILDLib.scan import read_scan, scan_from_array

SERIES_UID = "1.2.826.0.1.3680043.8.498.1501"


def write_series(folder, slices_hu, spacing_xy, positions_lps, direction, *, thickness_mm=1.0, uid=SERIES_UID):
    """One DICOM file per slice at its own ImagePositionPatient; ``direction`` gives the row/column axes."""
    folder.mkdir(parents=True, exist_ok=True)
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    orientation = "\\".join(f"{v:.6f}" for v in list(d[:, 0]) + list(d[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    # Files in a shuffled order: the reader sorts by position, not by name.
    for n in np.random.default_rng(0).permutation(len(slices_hu)):
        image = sitk.GetImageFromArray(np.ascontiguousarray(slices_hu[n], dtype=np.int16))
        image.SetSpacing(tuple(float(v) for v in spacing_xy))
        for key, value in {"0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
                           "0020|000e": uid, "0008|0018": f"{uid}.{n + 1}", "0020|0013": str(n + 1),
                           "0020|0032": "\\".join(f"{v:.4f}" for v in positions_lps[n]),
                           "0020|0037": orientation, "0018|0050": f"{thickness_mm:g}",
                           "0028|1052": "-1024", "0028|1053": "1"}.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"im{n:04d}.dcm"))
        writer.Execute(image)


def interval_keep(n_slices: int, period: int = 7) -> np.ndarray:
    """Slices 0, 1, 7, 8, 14, 15, ...: at 1.5 mm the gaps alternate 1.5 mm and 9 mm (1 mm / 9 mm-like)."""
    return np.array([k for k in range(n_slices) if k % period in (0, 1)])


def write_interval_copy(full, folder, keep) -> None:
    """The kept slices of an evenly spaced ``Scan`` as a DICOM series at their true positions."""
    d = np.asarray(full.direction).reshape(3, 3)
    positions = [np.asarray(full.origin_mm) + d[:, 2] * k * full.spacing_mm[2] for k in keep]
    write_series(folder, full.hu[keep], full.spacing_mm[:2], positions, full.direction,
                 thickness_mm=full.spacing_mm[2])


def dice(a, b) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def check_interval_series(full, interval, keep, *, min_dice=0.95, volume_tolerance=0.10):
    """What issue 15 asks of an interval series, against the full scan at the kept slices."""
    kept_mm = np.asarray(keep, dtype=np.float64) * full.spacing_mm[2]
    # Every slice at its true position (not at the median gap).
    assert interval.slice_positions_mm is not None
    np.testing.assert_allclose(interval.slice_positions_mm, kept_mm - kept_mm[0], atol=1e-3)
    np.testing.assert_array_equal(interval.hu, full.hu[keep])
    said = " ".join(interval.notes)
    assert "unevenly spaced" in said and "halfway to its neighbours" in said and "median" not in said

    full_mask = segment_lungs(full.hu, full.spacing_mm)
    mask = segment_lungs(interval.hu, interval.spacing_mm)
    assert dice(mask, full_mask[keep]) >= min_dice
    full_ml, interval_ml = full.mask_volume_ml(full_mask), interval.mask_volume_ml(mask)
    assert interval_ml == pytest.approx(full_ml, rel=volume_tolerance)

    # Patch centres lie on the true slice positions: the full scan's RAS of the same voxel.
    patches = candidate_patches(mask, interval.spacing_mm, patch_mm=20.0, origin_mm=interval.origin_mm,
                                direction=interval.direction, slice_positions_mm=interval.slice_positions_mm)
    assert len(patches) > 0
    centres = np.stack([keep[patches.slice_index], patches.row0 + (patches.size_rows - 1) / 2.0,
                        patches.col0 + (patches.size_cols - 1) / 2.0], axis=1)
    np.testing.assert_allclose(patches.center_ras_mm, full.index_to_ras(centres), atol=1e-2)

    # The written (regular-grid) image holds each sampled slice exactly where the full scan has it.
    image = interval.to_output_sitk(mask)
    out = sitk.GetArrayFromImage(image).astype(bool)
    assert image.GetSpacing()[2] == pytest.approx(full.spacing_mm[2], abs=1e-3)
    for n, k in enumerate(keep):
        lps = np.asarray(full.origin_mm) + np.asarray(full.direction).reshape(3, 3)[:, 2] * k * full.spacing_mm[2]
        plane = image.TransformPhysicalPointToIndex(tuple(float(v) for v in lps))[2]
        np.testing.assert_array_equal(out[plane], mask[n])
    full_at_kept = full_mask[keep]
    planes = [image.TransformPhysicalPointToIndex(tuple(float(v) for v in
              np.asarray(full.origin_mm) + np.asarray(full.direction).reshape(3, 3)[:, 2] * k * full.spacing_mm[2]))[2]
              for k in keep]
    assert dice(out[planes], full_at_kept) >= min_dice
    # Planes between sampled slices copy the nearest one, so the written mask's volume is the slab volume
    # (up to the half end slabs, which lie outside the series).
    written_ml = np.count_nonzero(out) * np.prod(image.GetSpacing()) / 1000.0
    assert written_ml == pytest.approx(interval_ml, rel=0.05)
    return full_ml, interval_ml


# ---------------------------------------------------------------------------------------------
# Geometry helpers
# ---------------------------------------------------------------------------------------------
def test_slabs_reach_halfway_to_the_neighbours():
    np.testing.assert_allclose(geometry.slab_thickness_mm([0, 1, 10, 11, 20]), [1, 5, 5, 5, 9])
    # evenly spaced slices: every slab is the spacing, so uniform scans keep their volumes
    np.testing.assert_allclose(geometry.slab_thickness_mm([0, 2.5, 5, 7.5]), [2.5] * 4)


def test_uniform_grid_holds_every_sampled_slice():
    step, planes, worst = geometry.uniform_grid([0, 1, 10, 11, 20, 21])
    assert step == pytest.approx(1.0) and worst < 1e-9
    np.testing.assert_array_equal(planes, [0, 1, 10, 11, 20, 21])
    # 1 mm then 9.5 mm: the slices fall on a 0.5 mm grid
    step, planes, worst = geometry.uniform_grid([0, 1, 10.5, 11.5, 21])
    assert step == pytest.approx(0.5) and worst < 1e-9
    nearest = geometry.nearest_sampled_slice([0, 1, 10, 11], 1.0)
    np.testing.assert_array_equal(nearest, [0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3])


def test_index_to_ras_uses_the_true_slice_positions():
    positions = (0.0, 1.0, 10.0, 11.0)
    ras = geometry.index_to_ras([[2, 0, 0], [1.5, 0, 0]], (1, 1, 3.67), (0, 0, 100.0), np.eye(3).ravel(), positions)
    np.testing.assert_allclose(ras[:, 2], [110.0, 105.5])


# ---------------------------------------------------------------------------------------------
# Phantom (runs without ../shared)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def thin_phantom_scan():
    ph = generate_phantom(7, shape_zyx=(84, 96, 96), spacing_mm=(3.0, 3.0, 1.5), ild=False)
    return scan_from_array(ph.hu, ph.spacing_mm, ph.origin_mm, ph.direction, source="thin phantom")


def test_phantom_interval_series_is_read_at_true_positions(tmp_path, thin_phantom_scan):
    full = thin_phantom_scan
    keep = interval_keep(full.hu.shape[0])
    write_interval_copy(full, tmp_path / "interval", keep)
    interval = read_scan(tmp_path / "interval")
    check_interval_series(full, interval, keep)


def test_phantom_irregular_series_is_read_at_true_positions(tmp_path, thin_phantom_scan):
    full = thin_phantom_scan
    rng = np.random.default_rng(5)
    keep = np.unique(np.concatenate([[0, full.hu.shape[0] - 1], rng.choice(full.hu.shape[0], 20, replace=False)]))
    write_interval_copy(full, tmp_path / "irregular", keep)
    interval = read_scan(tmp_path / "irregular")
    check_interval_series(full, interval, keep, volume_tolerance=0.15)


def test_analysis_of_an_interval_series_writes_outputs_on_the_true_positions(tmp_path, thin_phantom_scan, tiny_model):
    from ZeroShotILDLib.outputs import write_outputs
    from ZeroShotILDLib.pipeline import Analyzer

    full = thin_phantom_scan
    keep = interval_keep(full.hu.shape[0])
    write_interval_copy(full, tmp_path / "interval", keep)
    result = Analyzer(tiny_settings(patch_mm=20.0, slice_step_mm=1.0), model=tiny_model).analyze(str(tmp_path / "interval"))
    interval = read_scan(tmp_path / "interval")
    assert result.lung_volume_ml == pytest.approx(interval.mask_volume_ml(result.lung_mask), rel=1e-9)
    # every sampled slice is scored as it is
    assert set(np.unique(result.patches.slice_index)) <= set(range(len(keep)))
    true_s = full.index_to_ras(np.stack([keep[result.patches.slice_index],
                                         np.zeros(len(result.patches)), np.zeros(len(result.patches))], 1))[:, 2]
    np.testing.assert_allclose(result.patches.center_ras_mm[:, 2], true_s, atol=1e-2)
    out = write_outputs(result, interval, tmp_path / "out")
    written = json.loads((out / "result.json").read_text(encoding="utf-8"))
    assert any("unevenly spaced" in n for n in written["notes"])
    for name in ("lung_mask.nii.gz", "heatmap.nii.gz"):
        image = sitk.ReadImage(str(out / name))
        assert image.GetSpacing()[2] == pytest.approx(1.5, abs=1e-3)
        np.testing.assert_allclose(image.GetOrigin(), interval.origin_mm, atol=1e-3)
        array = sitk.GetArrayFromImage(image)
        for n, k in enumerate(keep):
            lps = np.asarray(full.origin_mm) + np.array([0, 0, k * 1.5]) @ np.asarray(full.direction).reshape(3, 3).T
            plane = image.TransformPhysicalPointToIndex(tuple(float(v) for v in lps))[2]
            if name == "lung_mask.nii.gz":
                np.testing.assert_array_equal(array[plane], result.lung_mask[n])
        if name == "heatmap.nii.gz":
            top = int(result.ranked[0])
            # A lung voxel of the top box (the heatmap is limited to the lung; the box's corner may not be lung).
            z0 = int(result.patches.slice_index[top])
            box = result.lung_mask[z0, result.patches.row0[top]:result.patches.row0[top] + result.patches.size_rows,
                                   result.patches.col0[top]:result.patches.col0[top] + result.patches.size_cols]
            dr, dc = (int(v[0]) for v in np.nonzero(box))
            r, c = int(result.patches.row0[top]) + dr, int(result.patches.col0[top]) + dc
            lps = np.asarray(full.origin_mm) + np.asarray(full.direction).reshape(3, 3) @ np.array(
                [c * full.spacing_mm[0], r * full.spacing_mm[1], keep[result.patches.slice_index[top]] * 1.5])
            x, y, z = image.TransformPhysicalPointToIndex(tuple(float(v) for v in lps))
            assert array[z, y, x] == pytest.approx(result.patch_probabilities[result.primary_prompt][top], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Real CTs (../shared/data/real/ct/totalseg, 1.5 mm): 1.5 mm / 9 mm interval copies
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["chest_crop_a", "chest_crop_b"])
def test_real_ct_interval_copy_matches_the_full_scan(tmp_path, name):
    full = read_scan(shared_data("real", "ct", "totalseg", f"{name}.nii.gz"))
    assert full.spacing_mm[2] == pytest.approx(1.5, abs=1e-3)
    keep = interval_keep(full.hu.shape[0])
    write_interval_copy(full, tmp_path / name, keep)
    interval = read_scan(tmp_path / name)
    gaps = np.diff(interval.slice_positions_mm)
    assert set(np.round(gaps, 2)) == {1.5, 9.0}
    check_interval_series(full, interval, keep)


# ---------------------------------------------------------------------------------------------
# Slicer (slicer-core): the volume node Slicer's DICOM module makes from an interval series
# ---------------------------------------------------------------------------------------------
def _slicer_interval_node(full, keep):
    """The node DICOMScalarVolumePlugin makes: an even grid plus a grid transform fixing each slice corner.

    Built as the plugin builds it (Slicer's default 'apply regularization transform'): a
    vtkMRMLGridTransformNode with a vtkOrientedGridTransform of 2 x 2 x slices displacements, on the
    volume's origin and directions, each displacement taking a corner of the even grid to the corner
    the DICOM headers give.
    """
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
    import sys
    import vtk
    from conftest import REPO
    sys.path.insert(0, str(REPO / "ZeroShotILD"))
    from ZeroShotILDMRML.headless import add_ct_volume, make_scene
    from ZeroShotILDMRML import volumes

    headless = make_scene()
    true_mm = np.asarray(keep, dtype=float) * full.spacing_mm[2]
    even_mm = (true_mm[-1] - true_mm[0]) / (len(keep) - 1)
    node = add_ct_volume(headless.scene, full.hu[keep], (full.spacing_mm[0], full.spacing_mm[1], even_mm),
                         full.origin_mm, full.direction, "interval CT")
    m = volumes.ijk_to_ras(node)
    nz, ny, nx = full.hu[keep].shape
    source = np.array([[[m @ [c * nx, r * ny, k, 1] for c in range(2)] for r in range(2)] for k in range(nz)])[..., :3]
    target = source.copy()
    normal = m[:3, 2] / np.linalg.norm(m[:3, 2])
    target += ((true_mm - true_mm[0]) - np.arange(nz) * even_mm)[:, None, None, None] * normal
    grid_node = headless.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "interval CT acquisition transform")
    grid = vtk.vtkImageData()
    grid.SetOrigin(*node.GetOrigin())
    grid.SetDimensions(2, 2, nz)
    spacing = node.GetSpacing()
    grid.SetSpacing(spacing[0] * nx, spacing[1] * ny, spacing[2])
    grid.AllocateScalars(vtk.VTK_DOUBLE, 3)
    transform = slicer.vtkOrientedGridTransform()
    direction = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(direction)
    transform.SetGridDirectionMatrix(direction)
    transform.SetDisplacementGridData(grid)
    grid_node.SetAndObserveTransformToParent(transform)
    node.SetAndObserveTransformNodeID(grid_node.GetID())
    displacement = slicer.util.arrayFromGridTransform(grid_node)
    displacement[:] = target - source
    slicer.util.arrayFromGridTransformModified(grid_node)
    # as the plugin checks: the transform takes every corner where the headers put it
    world = np.array([node.GetParentTransformNode().GetTransformToParent().TransformPoint(*p)
                      for p in source.reshape(-1, 3)])
    np.testing.assert_allclose(world, target.reshape(-1, 3), atol=1e-3)
    return headless, node, volumes


def test_slicer_node_with_acquisition_transform_gives_the_true_positions(thin_phantom_scan):
    full = thin_phantom_scan
    keep = interval_keep(full.hu.shape[0])
    headless, node, volumes = _slicer_interval_node(full, keep)
    scan = volumes.scan_from_volume_node(node)
    kept_mm = keep * full.spacing_mm[2]
    np.testing.assert_allclose(scan.slice_positions_mm, kept_mm - kept_mm[0], atol=1e-3)
    assert any("acquisition transform" in n for n in scan.notes)
    full_mask = segment_lungs(full.hu, full.spacing_mm)
    mask = segment_lungs(scan.hu, scan.spacing_mm)
    assert scan.mask_volume_ml(mask) == pytest.approx(full.mask_volume_ml(full_mask), rel=0.10)
    # Patch centres in the node's frame: a slice's true position, as the command line gives it.
    centre = scan.index_to_ras([[3, 10, 10]])[0]
    np.testing.assert_allclose(centre, full.index_to_ras([[keep[3], 10, 10]])[0], atol=1e-3)
    # Without the transform (hardened or evenly spaced) nothing changes.
    node.SetAndObserveTransformNodeID(None)
    assert volumes.scan_from_volume_node(node).slice_positions_mm is None


def test_slicer_sagittal_node_is_refused_with_what_to_do(thin_phantom_scan):
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
    import sys
    from conftest import REPO
    sys.path.insert(0, str(REPO / "ZeroShotILD"))
    from ZeroShotILDLib.errors import InputError
    from ZeroShotILDMRML.headless import add_ct_volume, make_scene
    from ZeroShotILDMRML import volumes

    assert slicer is not None
    headless = make_scene()
    sagittal = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=float)
    node = add_ct_volume(headless.scene, thin_phantom_scan.hu.transpose(2, 0, 1).copy(), (3.0, 1.5, 3.0),
                         (0.0, 0.0, 0.0), tuple(sagittal.ravel()), "sagittal CT")
    with pytest.raises(InputError, match="sagittal or coronal.*Orient Scalar Volume"):
        volumes.scan_from_volume_node(node)
