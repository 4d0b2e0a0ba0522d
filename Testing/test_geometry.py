"""Geometry and voxels that must not be analysed as if fine (issue 11), and axes that are not axial.

Each case is built at test time: NaN voxels in NIfTI, voxel sizes of 0 / NaN / 1e6 / 1e-6 mm,
volumes stored sagittally or coronally, obliquely cut volumes, a DICOM series with gantry tilt,
a damaged slice inside a series, and headers that declare far more voxels than the file holds.
Every refusal is one line naming the problem.
"""
from __future__ import annotations

import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from test_interval_series import write_series
from ZeroShotILDLib.errors import InputError
from ZeroShotILDLib.phantom import generate_phantom
from ZeroShotILDLib.scan import read_scan, scan_from_array

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def refused(path, *words):
    with pytest.raises(InputError) as info:
        read_scan(path)
    message = str(info.value)
    assert message and "\n" not in message
    assert info.value.__cause__ is None
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    return message


@pytest.fixture(scope="module")
def chest():
    """A small chest phantom, axial, identity direction, anisotropic voxels (so axes can be told apart)."""
    ph = generate_phantom(11, shape_zyx=(24, 64, 56), spacing_mm=(5.0, 5.5, 8.0), ild=False)
    return ph.hu.astype(np.int16)


def _image(hu, spacing, origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel())):
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(tuple(float(v) for v in direction))
    return image


# ---------------------------------------------------------------------------------------------
# Voxels and voxel sizes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_nan_or_inf_voxels_are_refused_in_every_format(tmp_path, chest, ext, bad):
    hu = chest.astype(np.float32)
    hu[3, 10, 10] = bad
    path = tmp_path / f"nan{ext}"
    sitk.WriteImage(_image(hu, (5.0, 5.5, 8.0)), str(path))
    refused(path, "NaN or infinite")


def _nifti_with_pixdim(tmp_path, chest, value, name):
    path = tmp_path / "base.nii"
    sitk.WriteImage(_image(chest, (5.0, 5.5, 8.0)), str(path))
    data = bytearray(path.read_bytes())
    data[76 + 12:76 + 16] = struct.pack("<f", value)  # pixdim[3]: the slice spacing
    out = tmp_path / name
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("value,shown", [(0.0, "0 mm"), (float("nan"), "nan mm"), (-2.0, "-2 mm")])
def test_nifti_slice_spacing_zero_or_nan_is_refused_not_made_1mm(tmp_path, chest, value, shown):
    # ITK reads these as 1 mm (lung 387 mL instead of 580): refuse from the header, with the value.
    refused(_nifti_with_pixdim(tmp_path, chest, value, "bad.nii"), shown, "along z")


@pytest.mark.parametrize("ext,old,new", [(".mha", b"ElementSpacing = 5 5.5 8", b"ElementSpacing = 5 5.5 0"),
                                         (".nrrd", b"(0,0,8)", b"(0,0,0)")])
def test_zero_spacing_in_nrrd_or_mha_is_named_as_such(tmp_path, chest, ext, old, new):
    path = tmp_path / f"base{ext}"
    sitk.WriteImage(_image(chest, (5.0, 5.5, 8.0)), str(path))
    data = path.read_bytes()
    assert old in data
    (tmp_path / f"zero{ext}").write_bytes(data.replace(old, new))
    message = refused(tmp_path / f"zero{ext}", "invalid voxel size")
    assert "truncated" not in message


@pytest.mark.parametrize("value,shown", [(1e6, "1e+06 mm"), (1e-6, "1e-06 mm"), (45.0, "45 mm")])
@pytest.mark.parametrize("ext", [".nii", ".nrrd"])
def test_implausible_spacing_is_refused_with_its_value(tmp_path, chest, value, shown, ext):
    path = tmp_path / f"odd{ext}"
    if ext == ".nii":
        path = _nifti_with_pixdim(tmp_path, chest, value, "odd.nii")
    else:
        sitk.WriteImage(_image(chest, (5.0, 5.5, value)), str(path))
    message = refused(path, shown, "along z", "0.05-30 mm")
    assert "spacing" in message


def test_implausible_spacing_is_refused_from_arrays_too(chest):
    with pytest.raises(InputError, match="1e\\+06 mm along z"):
        scan_from_array(chest, (0.7, 0.7, 1e6))


def test_plausible_spacings_still_read(tmp_path, chest):
    for spacing in [(0.06, 0.06, 0.1), (0.5, 0.5, 30.0)]:
        sitk.WriteImage(_image(chest, spacing), str(tmp_path / "ok.nrrd"))
        np.testing.assert_allclose(read_scan(tmp_path / "ok.nrrd").spacing_mm, spacing, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Axes: sagittal / coronal storage, oblique
# ---------------------------------------------------------------------------------------------
SAGITTAL = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=float)   # i: A-P, j: S-I, k: L-R (LPS columns)
CORONAL = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=float)    # i: L-R, j: S-I, k: A-P


@pytest.mark.parametrize("kind,columns", [("sagittal", SAGITTAL), ("coronal", CORONAL)])
def test_volume_stored_sagittally_or_coronally_is_read_as_axial_slices(tmp_path, chest, kind, columns):
    spacing = np.array([5.0, 5.5, 8.0])        # x (L-R), y (A-P), z (S-I) of the axial chest
    origin = (-100.0, 30.0, -250.0)
    # Store the same anatomy with the voxel axes permuted: axis c of the file runs along patient axis a_c.
    axes = [int(np.argmax(columns[:, c])) for c in range(3)]   # patient axis of each stored i, j, k
    stored = chest.transpose([2 - axes[2], 2 - axes[1], 2 - axes[0]])
    image = _image(np.ascontiguousarray(stored), spacing[axes], origin, tuple(columns.ravel()))
    path = tmp_path / f"{kind}.nii.gz"
    sitk.WriteImage(image, str(path))
    scan = read_scan(path)
    np.testing.assert_array_equal(scan.hu, chest)                 # axial slices again, same voxels
    np.testing.assert_allclose(scan.spacing_mm, spacing)
    np.testing.assert_allclose(np.asarray(scan.direction).reshape(3, 3), np.eye(3), atol=1e-9)
    np.testing.assert_allclose(scan.origin_mm, origin)
    assert any(kind in n and "axial" in n for n in scan.notes)
    # Physical positions are kept: a voxel of the scan is where the file has it.
    zyx = np.array([[3.0, 10.0, 20.0], [20.0, 50.0, 5.0]])
    for (z, y, x), ras in zip(zyx, scan.index_to_ras(zyx)):
        stored_index = [None, None, None]
        for c in range(3):
            stored_index[c] = (x, y, z)[axes[c]]
        lps = image.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in stored_index))
        np.testing.assert_allclose(ras, (-lps[0], -lps[1], lps[2]), atol=1e-6)
    # and outputs written with the scan's geometry overlay the file
    back = scan.to_sitk(scan.hu)
    point = image.TransformIndexToPhysicalPoint((7, 9, 11))
    assert back[back.TransformPhysicalPointToIndex(point)] == image[(7, 9, 11)]


def test_sagittal_dicom_series_is_read_as_axial_slices(tmp_path, chest):
    # Sagittal slices (one per x position): rows along A-P, columns along S-I.
    stored = chest.transpose(2, 0, 1)
    positions = [np.array([-100.0 + k * 5.0, 30.0, -250.0]) for k in range(stored.shape[0])]
    write_series(tmp_path / "sag", stored, (5.5, 8.0), positions, tuple(SAGITTAL.ravel()), thickness_mm=5.0)
    scan = read_scan(tmp_path / "sag")
    np.testing.assert_array_equal(scan.hu, chest)
    np.testing.assert_allclose(scan.spacing_mm, (5.0, 5.5, 8.0), atol=1e-4)
    np.testing.assert_allclose(np.asarray(scan.direction).reshape(3, 3), np.eye(3), atol=1e-6)
    np.testing.assert_allclose(scan.origin_mm, (-100.0, 30.0, -250.0), atol=1e-3)
    assert any("sagittal" in n for n in scan.notes)


def test_axial_volumes_keep_their_axes_whatever_the_in_plane_flips(tmp_path, chest):
    flips = np.diag([-1.0, -1.0, 1.0])  # feet-first / rotated in plane: still axial, left alone
    sitk.WriteImage(_image(chest, (5.0, 5.5, 8.0), direction=tuple(flips.ravel())), str(tmp_path / "f.nrrd"))
    scan = read_scan(tmp_path / "f.nrrd")
    np.testing.assert_array_equal(scan.hu, chest)
    np.testing.assert_allclose(scan.direction, flips.ravel())
    assert not any("reordered" in n for n in scan.notes)


def test_truly_oblique_volume_is_refused_with_its_angle(tmp_path, chest):
    a = math.radians(40.0)  # slices 40 degrees from axial (about the L-R axis)
    direction = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    sitk.WriteImage(_image(chest, (5.0, 5.5, 8.0), direction=tuple(direction.ravel())), str(tmp_path / "o.nii.gz"))
    refused(tmp_path / "o.nii.gz", "oblique", "40 degrees", "axial")


# ---------------------------------------------------------------------------------------------
# DICOM: gantry tilt, damaged slices
# ---------------------------------------------------------------------------------------------
def _ball_world(n_slices, tilt_deg, *, spacing=1.0, gap=3.0, centre=(0.0, 10.0, 30.0), size=80):
    """Slices of a tilted-gantry acquisition of a body with a dense ball at ``centre`` (LPS mm).

    Rows run along x; columns along y tilted by ``tilt_deg`` towards z; the table moves along z,
    so each slice's corner moves along z only (the images are not stacked along their normal).
    """
    t = math.radians(tilt_deg)
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, math.cos(t), math.sin(t)])
    corner0 = np.array([-size / 2 * spacing, -size / 2 * spacing * math.cos(t), -size / 2 * spacing * math.sin(t)])
    jj, ii = np.mgrid[:size, :size].astype(float)
    slices, corners = [], []
    for k in range(n_slices):
        corner = corner0 + np.array([0.0, 0.0, k * gap])
        pts = corner + ii[..., None] * spacing * row + jj[..., None] * spacing * col
        body = np.hypot(pts[..., 0] / 34.0, pts[..., 1] / 26.0) < 1.0
        lungs = body & (np.hypot((np.abs(pts[..., 0]) - 14.0) / 9.0, pts[..., 1] / 14.0) < 1.0)
        ball = np.linalg.norm(pts - np.asarray(centre), axis=-1) < 6.0
        hu = np.full((size, size), -1000, np.int16)
        hu[body] = 40
        hu[lungs] = -850
        hu[ball] = 900
        slices.append(hu)
        corners.append(corner)
    direction = np.stack([row, col, np.cross(row, col)], axis=1)
    return np.array(slices), corners, direction


def test_gantry_tilt_is_resampled_to_a_rectilinear_grid(tmp_path):
    centre = np.array([5.0, 8.0, 36.0])
    slices, corners, direction = _ball_world(28, 20.0, centre=centre)
    write_series(tmp_path / "tilt", slices, (1.0, 1.0), corners, direction.ravel(), thickness_mm=3.0)
    scan = read_scan(tmp_path / "tilt")
    assert any("gantry tilt of 20.0 degrees" in n for n in scan.notes)
    zyx = np.argwhere(scan.hu > 500).astype(float)
    ras = scan.index_to_ras(zyx).mean(axis=0)
    found = np.array([-ras[0], -ras[1], ras[2]])
    # Without the shear the ball lands ~10 mm off (the median-origin stack); with it, within a voxel.
    assert np.linalg.norm(found - centre) < 1.5, found
    # And ITK's own series reader, which ignores the tilt, places it far off: the case is real.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "tilt")))
    itk = reader.Execute()
    idx = np.argwhere(sitk.GetArrayFromImage(itk) > 500)[:, ::-1].astype(float)
    naive = np.mean([itk.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in idx], axis=0)
    assert np.linalg.norm(naive - centre) > 5.0


def test_steep_gantry_tilt_is_refused(tmp_path):
    slices, corners, direction = _ball_world(6, 40.0)
    write_series(tmp_path / "steep", slices, (1.0, 1.0), corners, direction.ravel(), thickness_mm=3.0)
    refused(tmp_path / "steep", "gantry tilt", "40", "reformat")


def _plain_series(folder, n=6):
    slices, corners, direction = _ball_world(n, 0.0)
    write_series(folder, slices, (1.0, 1.0), corners, direction.ravel(), thickness_mm=3.0)
    return sorted(folder.iterdir())


@pytest.mark.parametrize("keep_fraction", [0.05, 0.6])
def test_damaged_slice_in_a_series_is_an_error_naming_it(tmp_path, keep_fraction):
    files = _plain_series(tmp_path / "s")
    victim = files[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: int(len(data) * keep_fraction)])
    message = refused(tmp_path / "s", victim.name)
    assert "ignored" not in message


def test_unrelated_files_in_a_series_folder_are_still_ignored(tmp_path):
    files = _plain_series(tmp_path / "s")
    (tmp_path / "s" / "notes.txt").write_text("reading notes\n", encoding="utf-8")
    scan = read_scan(tmp_path / "s")
    assert scan.hu.shape[0] == len(files)
    assert any("1 non-DICOM" in n for n in scan.notes)


# ---------------------------------------------------------------------------------------------
# Headers that declare what the file does not hold
# ---------------------------------------------------------------------------------------------
def _huge_header(tmp_path, chest, ext):
    path = tmp_path / f"small{ext}"
    sitk.WriteImage(_image(chest[:2, :16, :16], (1.0, 1.0, 1.0)), str(path))
    data = path.read_bytes()
    if ext == ".nrrd":
        data = data.replace(b"sizes: 16 16 2", b"sizes: 1024 1024 1024")
    else:
        data = data.replace(b"DimSize = 16 16 2", b"DimSize = 1024 1024 1024")
    assert b"1024 1024 1024" in data
    out = tmp_path / f"huge{ext}"
    out.write_bytes(data)
    return out


@pytest.mark.parametrize("ext", [".nrrd", ".mha"])
def test_header_declaring_far_more_voxels_is_refused_before_reading(tmp_path, chest, ext):
    path = _huge_header(tmp_path, chest, ext)
    message = refused(path, "declares 1024x1024x1024", "2.0 GB", "KB")
    assert "No such file" not in message
    # Refused from the header: the process never grows by the declared 2 GB.
    code = ("import resource, sys\n"
            "from ZeroShotILDLib.scan import read_scan\n"
            "from ZeroShotILDLib.errors import InputError\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    read_scan(sys.argv[1])\nexcept InputError:\n    pass\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert run.returncode == 0, run.stderr[-500:]
    assert int(run.stdout.split()[-1]) < 200  # MB


def test_missing_detached_data_file_is_named(tmp_path, chest):
    path = tmp_path / "scan.mhd"
    sitk.WriteImage(_image(chest, (5.0, 5.5, 8.0)), str(path))
    raw = [p for p in tmp_path.iterdir() if p.suffix in (".raw", ".zraw")]
    assert raw
    raw[0].unlink()
    message = refused(path, raw[0].name, "missing")
    assert "No such file" not in message


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_says_permission_denied(tmp_path, chest):
    path = tmp_path / "locked.nii.gz"
    sitk.WriteImage(_image(chest, (5.0, 5.5, 8.0)), str(path))
    path.chmod(0)
    try:
        message = refused(path, "permission denied")
        assert "compression" not in message
    finally:
        path.chmod(0o600)


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_file_the_system_refuses_to_open_says_permission_denied(tmp_path, chest, monkeypatch, ext):
    # The same case as above for a root user (who may read anything): the OS's answer is simulated.
    path = tmp_path / f"locked{ext}"
    sitk.WriteImage(_image(chest, (5.0, 5.5, 8.0)), str(path))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(path) else real_access(p, mode, **kw))
    message = refused(path, "permission denied", str(path))
    assert "compression" not in message and "export" not in message
