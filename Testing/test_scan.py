"""Step 1 of the pipeline: reading a CT (ZeroShotILDLib.scan).

Every input is built at test time under tmp_path (a small phantom or a numpy array written with
SimpleITK); nothing here reads files committed to the repository. The real CTs in ../shared are
read at the end and skipped cleanly when that folder is absent.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared_data
from ZeroShotILDLib.errors import InputError
from ZeroShotILDLib.phantom import generate_phantom
from ZeroShotILDLib.scan import AIR_HU, read_scan, scan_from_array, scan_from_sitk

SPACING_MM = (1.7, 1.9, 6.0)
ORIGIN_MM = (-120.5, 33.25, -410.0)


def _rotation(deg_z: float, deg_x: float) -> tuple:
    """A proper rotation (det +1): about z, then about x; row-major 9-tuple as SimpleITK wants."""
    cz, sz = math.cos(math.radians(deg_z)), math.sin(math.radians(deg_z))
    cx, sx = math.cos(math.radians(deg_x)), math.sin(math.radians(deg_x))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return tuple(float(v) for v in (rx @ rz).ravel())


DIRECTION = _rotation(25.0, 10.0)


@pytest.fixture(scope="module")
def phantom():
    return generate_phantom(5, shape_zyx=(20, 64, 64), spacing_mm=(5.0, 5.0, 12.0), ild=False)


@pytest.fixture(scope="module")
def phantom_image(phantom):
    image = sitk.GetImageFromArray(phantom.hu)
    image.SetSpacing(SPACING_MM)
    image.SetOrigin(ORIGIN_MM)
    image.SetDirection(DIRECTION)
    return image


def _refused(path_or_paths, *words):
    """Read and expect a one-line InputError naming the problem (no chained traceback)."""
    with pytest.raises(InputError) as info:
        read_scan(path_or_paths)
    err = info.value
    message = str(err)
    assert "\n" not in message and message.strip() == message and message
    # `raise ... from None`: Python shows no "During handling of the above exception" chain.
    assert err.__cause__ is None
    assert err.__context__ is None or err.__suppress_context__
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    return message


# ---------------------------------------------------------------------------------------------
# Volume files: NIfTI, NRRD, MetaImage
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_volume_round_trip_keeps_values_and_geometry(tmp_path, phantom, phantom_image, ext):
    path = tmp_path / f"scan{ext}"
    sitk.WriteImage(phantom_image, str(path), True)
    scan = read_scan(path)
    assert scan.hu.dtype == np.int16
    assert scan.shape_zyx == phantom.hu.shape
    np.testing.assert_array_equal(scan.hu, phantom.hu)
    np.testing.assert_allclose(scan.spacing_mm, SPACING_MM, atol=1e-4)
    np.testing.assert_allclose(scan.origin_mm, ORIGIN_MM, atol=1e-3)
    np.testing.assert_allclose(scan.direction, DIRECTION, atol=1e-5)
    assert scan.source == str(path)
    # the geometry goes back out unchanged (heatmap.nii.gz / lung_mask.nii.gz rely on it)
    back = scan.to_sitk(np.ones(scan.hu.shape, dtype=bool))
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(back.GetDirection(), DIRECTION, atol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), ORIGIN_MM, atol=1e-3)


def test_float_volume_is_rounded_to_int16_hu(tmp_path, phantom):
    hu = phantom.hu.astype(np.float32) + 0.4
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(SPACING_MM)
    sitk.WriteImage(image, str(tmp_path / "float.nrrd"))
    scan = read_scan(tmp_path / "float.nrrd")
    assert scan.hu.dtype == np.int16
    np.testing.assert_array_equal(scan.hu, phantom.hu)


def test_index_to_ras_matches_simpleitk_with_lps_flip(phantom_image):
    scan = scan_from_sitk(phantom_image, source="rotated")
    rng = np.random.default_rng(0)
    zyx = rng.uniform(0, 1, size=(20, 3)) * np.array(scan.shape_zyx)
    ras = scan.index_to_ras(zyx)
    assert ras.shape == (20, 3)
    for (z, y, x), got in zip(zyx, ras):
        lps = phantom_image.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(z)))
        np.testing.assert_allclose(got, (-lps[0], -lps[1], lps[2]), atol=1e-6)
    # one point as a plain triple works too
    np.testing.assert_allclose(scan.index_to_ras([0, 0, 0])[0],
                               (-ORIGIN_MM[0], -ORIGIN_MM[1], ORIGIN_MM[2]), atol=1e-9)


# ---------------------------------------------------------------------------------------------
# DICOM series
# ---------------------------------------------------------------------------------------------
def _write_dicom_series(folder, hu, spacing_mm, origin_mm, series_uid, *, modality="CT",
                        intercept=-1024.0, slope=1.0, names=None, extra_tags=None):
    """One file per slice with the tags a CT series carries; GDCM applies the inverse rescale."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(hu.shape[0]):
        image = sitk.GetImageFromArray(np.ascontiguousarray(hu[k], dtype=np.int16))
        image.SetSpacing(tuple(float(v) for v in spacing_mm[:2]))
        position = np.asarray(origin_mm, dtype=float) + np.array([0.0, 0.0, k * spacing_mm[2]])
        tags = {
            "0008|0060": modality,
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.8.498.1",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.4f}" for v in position),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": f"{spacing_mm[2]:.3f}",
            "0028|1052": f"{intercept:g}",
            "0028|1053": f"{slope:g}",
            "0028|1054": "HU",
        }
        tags.update(extra_tags or {})
        for key, value in tags.items():
            image.SetMetaData(key, value)
        name = names[k] if names else f"slice_{k:03d}.dcm"
        writer.SetFileName(str(folder / name))
        writer.Execute(image)


def _small_chest(n_slices, ny=40, nx=48, seed=0):
    """A body of soft tissue with two air 'lungs' and a bone, in air, with a little noise."""
    rng = np.random.default_rng(seed)
    hu = np.full((n_slices, ny, nx), -1000, np.int16)
    hu[:, 6:34, 6:42] = 40
    hu[:, 10:28, 10:22] = -850
    hu[:, 10:28, 26:38] = -850
    hu[:, 28:32, 22:26] = 700
    hu[:, 6:34, 6:42] += rng.integers(-5, 6, size=(n_slices, 28, 36)).astype(np.int16)
    return hu


def test_dicom_series_folder_reads_hu_and_geometry(tmp_path):
    hu = _small_chest(6)
    # file names in reverse order: slices must be sorted by position, not by name
    names = [f"img_{5 - k}.dcm" for k in range(6)]
    _write_dicom_series(tmp_path / "series", hu, (0.7, 0.8, 2.5), (-10.0, -20.0, 30.0), "1.2.826.0.1.3680043.8.498.11",
                        names=names)
    scan = read_scan(tmp_path / "series")
    np.testing.assert_array_equal(scan.hu, hu)
    np.testing.assert_allclose(scan.spacing_mm, (0.7, 0.8, 2.5), atol=1e-4)
    np.testing.assert_allclose(scan.origin_mm, (-10.0, -20.0, 30.0), atol=1e-3)
    np.testing.assert_allclose(scan.direction, np.eye(3).ravel(), atol=1e-6)
    # a list of the slice files reads the same volume
    files = sorted((tmp_path / "series").iterdir())
    np.testing.assert_array_equal(read_scan(files).hu, hu)


def test_oblique_dicom_series_matches_simpleitk_series_reader(tmp_path):
    # gantry-tilt-like orientation: rows along x, columns tilted 0.3 rad towards z
    tilt = 0.3
    orientation = (1.0, 0.0, 0.0, 0.0, math.cos(tilt), math.sin(tilt))
    normal = np.cross(orientation[:3], orientation[3:])
    hu = _small_chest(5)
    folder = tmp_path / "oblique"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(5):
        image = sitk.GetImageFromArray(hu[k])
        image.SetSpacing((0.7, 0.8))
        position = np.array([5.0, -3.0, 20.0]) + normal * 2.0 * k
        for key, value in {"0008|0060": "CT", "0020|000e": "1.2.826.0.1.3680043.8.498.51",
                           "0008|0018": f"1.2.826.0.1.3680043.8.498.51.{k}", "0020|0013": str(k + 1),
                           "0020|0032": "\\".join(f"{v:.5f}" for v in position),
                           "0020|0037": "\\".join(f"{v:.6f}" for v in orientation),
                           "0018|0050": "2", "0028|1052": "-1024", "0028|1053": "1"}.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{4 - k}.dcm"))
        writer.Execute(image)
    scan = read_scan(folder)
    series = sitk.ImageSeriesReader()
    series.SetFileNames(series.GetGDCMSeriesFileNames(str(folder)))
    reference = series.Execute()
    np.testing.assert_array_equal(scan.hu, sitk.GetArrayFromImage(reference))
    np.testing.assert_allclose(scan.spacing_mm, reference.GetSpacing(), atol=1e-3)
    np.testing.assert_allclose(scan.origin_mm, reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(scan.direction, reference.GetDirection(), atol=1e-3)
    zyx = np.array([[4.0, 39.0, 47.0], [2.5, 10.0, 3.0]])
    for point, ras in zip(zyx, scan.index_to_ras(zyx)):
        lps = reference.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in point[::-1]))
        np.testing.assert_allclose(ras, (-lps[0], -lps[1], lps[2]), atol=1e-2)


def test_dicom_rescale_slope_is_applied(tmp_path):
    hu = _small_chest(3)
    hu[hu > 0] = (hu[hu > 0] // 2) * 2   # representable with slope 2
    hu[hu < 0] = (hu[hu < 0] // 2) * 2
    _write_dicom_series(tmp_path / "s", hu, (1.0, 1.0, 3.0), (0.0, 0.0, 0.0), "1.2.826.0.1.3680043.8.498.12",
                        intercept=-2048.0, slope=2.0)
    scan = read_scan(tmp_path / "s")
    np.testing.assert_array_equal(scan.hu, hu)


def test_folder_with_two_series_uses_the_longest_and_says_so(tmp_path):
    folder = tmp_path / "two"
    long_hu, short_hu = _small_chest(7, seed=1), _small_chest(3, seed=2)
    short_hu[:, 10:28, 10:22] = -700      # tell the two apart
    _write_dicom_series(folder, short_hu, (0.8, 0.8, 5.0), (0.0, 0.0, 0.0), "1.2.826.0.1.3680043.8.498.21",
                        names=[f"a{k}.dcm" for k in range(3)])
    _write_dicom_series(folder, long_hu, (0.8, 0.8, 1.25), (0.0, 0.0, 0.0), "1.2.826.0.1.3680043.8.498.22",
                        names=[f"b{k}.dcm" for k in range(7)])
    scan = read_scan(folder)
    assert scan.shape_zyx == long_hu.shape
    np.testing.assert_array_equal(scan.hu, long_hu)
    assert scan.spacing_mm[2] == pytest.approx(1.25, abs=1e-3)
    said = " ".join(scan.notes)
    assert "2 DICOM series" in said and "7 slices" in said


def test_non_ct_dicom_series_is_refused(tmp_path):
    _write_dicom_series(tmp_path / "mr", _small_chest(3), (1.0, 1.0, 3.0), (0.0, 0.0, 0.0),
                        "1.2.826.0.1.3680043.8.498.31", modality="MR")
    _refused(tmp_path / "mr", "MR", "not CT")


def test_dicom_padding_from_the_header_is_air(tmp_path):
    # Scanners store padding as a raw value (PixelPaddingValue) that rescales to -3024 or -2048 HU.
    hu = _small_chest(3)
    hu[:, :, :3] = -3024
    hu[:, :3, :] = -2048
    _write_dicom_series(tmp_path / "pad", hu, (1.0, 1.0, 3.0), (0.0, 0.0, 0.0), "1.2.826.0.1.3680043.8.498.41",
                        intercept=-3024.0, extra_tags={"0028|0120": "0"})
    scan = read_scan(tmp_path / "pad")
    assert scan.hu.min() >= -1024
    assert (scan.hu[:, :, :3] == AIR_HU).all() and (scan.hu[:, :3, :] == AIR_HU).all()
    np.testing.assert_array_equal(scan.hu[:, 3:, 3:], hu[:, 3:, 3:])
    assert any("padding" in n and "-3024" in n for n in scan.notes)


# ---------------------------------------------------------------------------------------------
# Padding in volume files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_hu", [-2048, -3024, -2000])
def test_padding_values_become_air(tmp_path, phantom, padding_hu):
    hu = phantom.hu.copy()
    ny, nx = hu.shape[1:]
    yy, xx = np.mgrid[:ny, :nx]
    outside = (yy - ny / 2 + 0.5) ** 2 + (xx - nx / 2 + 0.5) ** 2 > (nx / 2) ** 2
    hu[:, outside] = padding_hu
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(SPACING_MM)
    sitk.WriteImage(image, str(tmp_path / "padded.nii.gz"))
    scan = read_scan(tmp_path / "padded.nii.gz")
    assert (scan.hu[:, outside] == AIR_HU).all()
    np.testing.assert_array_equal(scan.hu[:, ~outside], phantom.hu[:, ~outside])
    assert any("padding" in n and str(padding_hu) in n for n in scan.notes)


def test_phantom_padding_value_is_mapped_to_air(tmp_path):
    ph = generate_phantom(2, shape_zyx=(8, 48, 48), spacing_mm=(7.0, 7.0, 20.0), ild=False,
                          padding_value=-3024)
    assert (ph.hu == -3024).any()
    ph.save(tmp_path / "p.mha")
    scan = read_scan(tmp_path / "p.mha")
    assert scan.hu.min() > -1500
    np.testing.assert_array_equal(scan.hu[ph.hu == -3024], AIR_HU)


def test_pasted_constant_frame_becomes_air(phantom):
    hu = phantom.hu.copy()
    hu[:, :4, :] = 0
    hu[:, -4:, :] = 0
    hu[:, :, :4] = 0
    hu[:, :, -4:] = 0
    scan = scan_from_array(hu, (5.0, 5.0, 12.0), source="framed")
    assert (scan.hu[:, :4, :] == AIR_HU).all() and (scan.hu[:, :, -4:] == AIR_HU).all()
    np.testing.assert_array_equal(scan.hu[:, 4:-4, 4:-4], phantom.hu[:, 4:-4, 4:-4])
    assert any("frame" in n for n in scan.notes)


# ---------------------------------------------------------------------------------------------
# 2-D input
# ---------------------------------------------------------------------------------------------
def test_single_hu_slice_reads_as_one_slice_volume(tmp_path, phantom):
    image = sitk.GetImageFromArray(phantom.hu[10])
    image.SetSpacing((0.6, 0.7))
    sitk.WriteImage(image, str(tmp_path / "slice.nrrd"))
    scan = read_scan(tmp_path / "slice.nrrd")
    assert scan.shape_zyx == (1,) + phantom.hu.shape[1:]
    np.testing.assert_allclose(scan.spacing_mm, (0.6, 0.7, 1.0))
    assert any("2-D" in n for n in scan.notes)


def test_grayscale_8bit_picture_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    sitk.WriteImage(sitk.GetImageFromArray(rng.integers(0, 256, (32, 32), dtype=np.uint8)),
                    str(tmp_path / "gray.nrrd"))
    _refused(tmp_path / "gray.nrrd", "not", "Hounsfield")


# ---------------------------------------------------------------------------------------------
# What is not a CT in HU
# ---------------------------------------------------------------------------------------------
def test_mr_like_volume_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    mr = rng.integers(0, 4001, size=(12, 32, 32)).astype(np.int16)
    image = sitk.GetImageFromArray(mr)
    image.SetSpacing((1.0, 1.0, 3.0))
    sitk.WriteImage(image, str(tmp_path / "t1.nii.gz"))
    msg = _refused(tmp_path / "t1.nii.gz", "MR", "Hounsfield")
    assert "0..4000" in msg


@pytest.mark.parametrize("ext,kind", [(".png", "PNG"), (".jpg", "JPEG")])
def test_rgb_photo_is_refused(tmp_path, ext, kind):
    rng = np.random.default_rng(2)
    photo = sitk.GetImageFromArray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), isVector=True)
    path = tmp_path / f"photo{ext}"
    sitk.WriteImage(photo, str(path))
    _refused(path, kind, "not a CT")
    # the same bytes behind a volume extension are still named for what they are
    disguised = tmp_path / "photo.nii.gz"
    disguised.write_bytes(path.read_bytes())
    _refused(disguised, "not a")


def test_rgb_volume_is_refused(tmp_path):
    rgb = sitk.GetImageFromArray(np.zeros((4, 16, 16, 3), dtype=np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.mha"))
    _refused(tmp_path / "rgb.mha", "3 values per pixel", "colour")


@pytest.mark.parametrize("name", ["empty.nii.gz", "empty.nii", "empty.nrrd", "empty.dcm"])
def test_empty_file_is_refused(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    _refused(tmp_path / name, "empty")


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_truncated_nifti_is_refused(tmp_path, phantom, ext):
    path = tmp_path / f"whole{ext}"
    sitk.WriteImage(phantom.to_sitk(), str(path))
    data = path.read_bytes()
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(data[: len(data) // 2])
    _refused(cut, "truncated")


def test_corrupt_nifti_gz_is_refused(tmp_path, phantom):
    # Bytes damaged in the middle of the deflate stream, file size unchanged (bit rot, bad copy).
    path = tmp_path / "whole.nii.gz"
    sitk.WriteImage(phantom.to_sitk(), str(path), True)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0x5A for b in data[middle:middle + 64])
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(bytes(data))
    _refused(bad, "truncated or corrupt")


def test_8bit_volume_is_refused_without_crashing(tmp_path):
    # uint8/int8 pixels must not crash the int16 conversion (NumPy 2 promotion rules)
    # 8-bit pixels cannot hold air (-1000 HU): refused with the HU reason, not an OverflowError
    picture = np.random.default_rng(3).integers(0, 256, (3, 16, 16), dtype=np.uint8)
    with pytest.raises(InputError, match="non-HU"):
        scan_from_array(picture, (1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="no air"):
        scan_from_array(picture.astype(np.int8), (1.0, 1.0, 1.0))


def test_corrupt_nrrd_is_refused(tmp_path, phantom):
    path = tmp_path / "whole.nrrd"
    sitk.WriteImage(phantom.to_sitk(), str(path), True)
    data = path.read_bytes()
    (tmp_path / "cut.nrrd").write_bytes(data[: len(data) // 2])
    _refused(tmp_path / "cut.nrrd", "truncated or corrupt")


def test_folder_without_images_is_refused(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("nothing to see", encoding="utf-8")
    (folder / "table.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    _refused(folder, "no DICOM files")
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(empty, "empty folder")


def test_wrong_extension_is_refused(tmp_path):
    path = tmp_path / "scan.txt"
    path.write_text("this is not a scan\n", encoding="utf-8")
    _refused(path, "text file", "NIfTI")
    other = tmp_path / "scan.xyz"
    other.write_bytes(bytes(range(256)))
    _refused(other, "unsupported file type", ".xyz")


def test_missing_path_is_refused(tmp_path):
    _refused(tmp_path / "nope.nii.gz", "does not exist")
    _refused([], "empty list")


def test_non_dicom_in_a_file_list_is_refused(tmp_path):
    path = tmp_path / "x.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.uint8)), str(path))
    _refused([path], "PNG", "not a DICOM slice")


def test_scan_from_array_validates_its_arguments(phantom):
    with pytest.raises(InputError, match="spacing"):
        scan_from_array(phantom.hu, (1.0, 0.0, 1.0))
    with pytest.raises(InputError, match="dimensions"):
        scan_from_array(np.zeros((2, 2, 2, 2)), (1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="NaN"):
        bad = phantom.hu.astype(np.float32)
        bad[0, 0, 0] = np.nan
        scan_from_array(bad, (1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="constant"):
        scan_from_array(np.full((3, 8, 8), -1000), (1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="direction"):
        scan_from_array(phantom.hu, (1.0, 1.0, 1.0), direction=(1.0, 0.0, 0.0))


# ---------------------------------------------------------------------------------------------
# Real CTs (../shared/data/real/ct)
# ---------------------------------------------------------------------------------------------
REAL_ITEMS = [
    "totalseg/chest_crop_a.nii.gz",
    "totalseg/chest_crop_b.nii.gz",
    "totalseg/abdomen_lung_bases.nii.gz",
    "totalseg/abdomen_dicom_series",
    "lidc_slices",
    "osic_ipf_sparse",
]


@pytest.mark.parametrize("item", REAL_ITEMS)
def test_real_ct_reads_with_plausible_hu(item):
    path = shared_data("real", "ct", *item.split("/"))
    scan = read_scan(path)
    hu = scan.hu
    assert hu.dtype == np.int16 and hu.ndim == 3 and min(hu.shape) >= 2
    assert all(s > 0 for s in scan.spacing_mm)
    assert scan.voxel_volume_ml > 0
    # padding mapped: nothing far below air remains
    assert hu.min() >= -1300
    # air (outside the body or in the lungs) near -1000 HU, and a body of soft tissue
    assert np.mean(hu < -900) > 0.005
    assert np.mean((hu > -200) & (hu < 200)) > 0.05
    assert np.percentile(hu, 0.5) == pytest.approx(-1000, abs=120)
    # some bone
    assert hu.max() > 300


def test_real_sparse_series_and_padding_are_reported():
    scan = read_scan(shared_data("real", "ct", "osic_ipf_sparse"))
    assert scan.spacing_mm[2] == pytest.approx(10.0, abs=0.5)
    said = " ".join(scan.notes)
    assert "sparse" in said and "-3024" in said
    lidc = read_scan(shared_data("real", "ct", "lidc_slices"))
    assert lidc.shape_zyx[0] == 2
    assert any("-2048" in n for n in lidc.notes)
