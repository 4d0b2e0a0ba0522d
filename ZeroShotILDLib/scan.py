"""Step 1 of the pipeline: read a CT scan into Hounsfield units with its geometry.

``read_scan`` accepts NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage
(``.mha``, ``.mhd``), a folder holding a DICOM series (or several: the series with the most
slices is used), a single DICOM file, or a list of DICOM slice files. Everything that is not a CT
in HU is refused with ``errors.InputError`` and a one-line message saying what to give instead.

What the reader does to the pixels, and why:

- DICOM rescale slope/intercept are applied (GDCM does this per slice), so values are HU.
- Scanner padding outside the reconstructed field of view (any value at or below -1500 HU, e.g.
  -2048, -3024) and a constant frame pasted around every side of a slice (OSIC pastes 0 HU around
  the reconstruction) are set to -1000 HU (air), so that they look like the air they replace.
- The array is ``int16`` ``[z, y, x]``: HU are integers by definition, and 2 bytes per voxel keeps a
  512 x 512 x 600 scan at 300 MB. Values are rounded and clipped to the int16 range.
- Slices read one by one from DICOM are sorted along the slice normal; the z spacing comes from the
  slice positions (not the slice thickness). When the gaps differ (interval HRCT, missing slices)
  each slice keeps its own position (``Scan.slice_positions_mm``). Gantry tilt is undone by
  shifting each slice in its plane onto a rectilinear grid; a slice that cannot be read is an error.
- A volume stored as sagittal or coronal slices has its axes reordered to axial slices (the
  physical geometry is unchanged); slices more than 30 degrees from axial are refused.
- Headers are checked before the voxels are read: a voxel size outside 0.05-30 mm, NaN/inf
  voxels, and more declared voxels than the file can hold are refused with the reason.

Decision on 2-D input: a single slice (a 2-D image or one DICOM file) is read as a volume of one
slice when it passes the same CT checks as a volume (scalar pixels, air or lung near -1000 HU);
colour pictures and non-HU images are refused. The z spacing of one slice is its DICOM slice
thickness, or 1 mm.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np

from .errors import InputError
from . import geometry

if TYPE_CHECKING:  # annotations only; the readers import SimpleITK where they use it
    import SimpleITK as sitk

#: Values at or below this are scanner padding outside the reconstruction, not anatomy.
PADDING_HU = -1500
AIR_HU = -1000
#: A CT of the chest (or of anything with air around or inside it) has voxels darker than this.
AIR_OR_LUNG_HU = -500
#: Fraction of voxels that must be air or lung for an image to count as a CT in HU.
MIN_AIR_FRACTION = 1e-3

WHAT_TO_GIVE = "give a NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr) or MetaImage (.mha/.mhd) file or a DICOM folder"
VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")
_OTHER_KINDS = {
    ".png": "a PNG image", ".jpg": "a JPEG image", ".jpeg": "a JPEG image", ".bmp": "a BMP image",
    ".gif": "a GIF image", ".tif": "a TIFF image", ".tiff": "a TIFF image", ".webp": "a WebP image",
    ".txt": "a text file", ".csv": "a text (CSV) file", ".json": "a JSON file", ".md": "a text file",
    ".pdf": "a PDF document", ".zip": "a ZIP archive", ".npy": "a NumPy array file", ".npz": "a NumPy archive",
    ".pt": "a PyTorch file", ".safetensors": "a weights file",
}
_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"%PDF", "a PDF document"), (b"PK\x03\x04", "a ZIP archive"), (b"BM", "a BMP image"))
_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# DICOM tags read from slice headers (no patient identifiers are read or kept).
_TAG_MODALITY = "0008|0060"
_TAG_SERIES = "0020|000e"
_TAG_THICKNESS = "0018|0050"
_TAG_IMAGE_TYPE = "0008|0008"


@dataclass
class Scan:
    """A CT volume in HU with the geometry needed to place masks and patches in patient space.

    Attributes
    ----------
    hu : ndarray, int16, [z, y, x]
        Hounsfield units; scanner padding is -1000 (air).
    spacing_mm : tuple of 3 floats
        Voxel size (x, y, z) in mm, as SimpleITK reports it.
    origin_mm : tuple of 3 floats
        Centre of voxel [0, 0, 0] in LPS mm.
    direction : tuple of 9 floats
        Row-major 3x3 direction cosines (SimpleITK order).
    source : str
        The path the user gave (nothing from the DICOM header is added).
    notes : list of str
        Human-readable remarks on how the scan was read.
    slice_positions_mm : tuple of floats or None
        Offset of each slice from slice 0 along the slice normal (mm), for a series whose slices
        are not evenly spaced (interval HRCT: 1 mm slices with gaps alternating 1 mm and 9 mm).
        ``None`` for evenly spaced slices, which sit ``spacing_mm[2]`` apart. When set,
        ``spacing_mm[2]`` is the mean gap, a nominal value for 3-D morphology only: positions,
        volumes and written images use the true positions.
    dicom_files : tuple of str or None
        For a scan read from DICOM whose voxels lie on the source images' own planes: the file of
        each slice in ``hu`` order. DICOM results (SEG, SR) read
        their references from these. ``None`` otherwise (other formats; a series resampled on
        reading: gantry tilt, or sagittal/coronal slices turned axial; a multi-frame file).
    """

    hu: np.ndarray
    spacing_mm: tuple
    origin_mm: tuple
    direction: tuple
    source: str = ""
    notes: list = field(default_factory=list)
    slice_positions_mm: Optional[tuple] = None
    dicom_files: Optional[tuple] = None

    @property
    def shape_zyx(self) -> tuple:
        return tuple(int(n) for n in self.hu.shape)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (spacing product in mm^3 / 1000)."""
        return float(np.prod(np.asarray(self.spacing_mm, dtype=np.float64))) / 1000.0

    @property
    def slab_mm(self) -> np.ndarray:
        """Thickness of body each slice stands for (mm): the spacing, or halfway to each neighbour."""
        if self.slice_positions_mm is None:
            return np.full(self.hu.shape[0], float(self.spacing_mm[2]))
        return geometry.slab_thickness_mm(self.slice_positions_mm)

    def mask_volume_ml(self, mask: np.ndarray) -> float:
        """Volume of a [z, y, x] mask in mL, each slice counted over its slab (``slab_mm``)."""
        per_slice = np.count_nonzero(np.asarray(mask).reshape(mask.shape[0], -1), axis=1)
        area_mm2 = float(self.spacing_mm[0]) * float(self.spacing_mm[1])
        return float(np.dot(per_slice, self.slab_mm)) * area_mm2 / 1000.0

    def to_output_sitk(self, array: np.ndarray) -> sitk.Image:
        """A per-slice ``array`` as an image that overlays the original slices in patient space.

        Evenly spaced scans: ``to_sitk``. An interval series: a regular grid (``geometry.uniform_grid``)
        from the first to the last slice, each sampled slice on its own plane and each plane between
        them a copy of the nearest sampled slice (the slab rule the lung volume uses).
        """
        if self.slice_positions_mm is None:
            return self.to_sitk(array)
        import SimpleITK as sitk
        data = np.asarray(array)
        if data.shape != self.hu.shape:
            raise ValueError(f"array shape {data.shape} differs from the scan shape {self.hu.shape}")
        step, planes, _ = geometry.uniform_grid(self.slice_positions_mm)
        uniform = geometry.to_uniform_slices(data, self.slice_positions_mm, step, planes)
        if uniform.dtype == bool:
            uniform = uniform.astype(np.uint8)
        image = sitk.GetImageFromArray(uniform)
        image.SetSpacing((float(self.spacing_mm[0]), float(self.spacing_mm[1]), float(step)))
        image.SetOrigin(tuple(float(v) for v in self.origin_mm))
        image.SetDirection(tuple(float(v) for v in self.direction))
        return image

    def to_sitk(self, array: Optional[np.ndarray] = None) -> sitk.Image:
        """``array`` (default ``hu``; same [z, y, x] shape) as a SimpleITK image with this scan's geometry.

        Boolean arrays become ``uint8`` (SimpleITK has no bool pixel type). For an interval series
        (``slice_positions_mm``) the image is on the nominal even spacing; ``to_output_sitk`` places
        the slices where they are.
        """
        # Imported where used, so in-memory scans (phantoms, Slicer arrays) need no SimpleITK.
        import SimpleITK as sitk
        data = self.hu if array is None else np.asarray(array)
        if data.shape != self.hu.shape:
            raise ValueError(f"array shape {data.shape} differs from the scan shape {self.hu.shape}")
        if data.dtype == bool:
            data = data.astype(np.uint8)
        image = sitk.GetImageFromArray(data)
        image.SetSpacing(tuple(float(v) for v in self.spacing_mm))
        image.SetOrigin(tuple(float(v) for v in self.origin_mm))
        image.SetDirection(tuple(float(v) for v in self.direction))
        return image

    def index_to_ras(self, zyx: np.ndarray) -> np.ndarray:
        """Continuous voxel indices ``[z, y, x]`` (N, 3) -> RAS millimetres (N, 3)."""
        return geometry.index_to_ras(zyx, self.spacing_mm, self.origin_mm, self.direction, self.slice_positions_mm)


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------
def read_scan(path: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> Scan:
    """Read a CT scan from a file, a DICOM folder or a list of DICOM slice files.

    Parameters
    ----------
    path : path or sequence of paths
        NIfTI/NRRD/MetaImage file, DICOM folder, single DICOM file, or a list of DICOM files.

    Returns
    -------
    Scan
        int16 HU volume [z, y, x] with spacing (mm), LPS origin (mm) and direction.

    Raises
    ------
    InputError
        The path is missing, is not a CT volume, is corrupt, or does not hold HU values.
    """
    if isinstance(path, (list, tuple)):
        files = [Path(p) for p in path]
        if not files:
            raise InputError(f"empty list of files: {WHAT_TO_GIVE}")
        for f in files:
            if not f.is_file():
                raise InputError(f"{f} does not exist or is not a file: check the path")
        source = str(files[0].parent) if len(files) > 1 else str(files[0])
        return _read_dicom_files(files, source, [])
    p = Path(path)
    source = str(path)
    if not p.exists():
        raise InputError(f"{source} does not exist: check the path")
    if p.is_dir():
        return _read_dicom_folder(p, source)
    if not os.access(p, os.R_OK):
        raise InputError(f"{source} cannot be opened (permission denied): check the file's permissions")
    if p.stat().st_size == 0:
        raise InputError(f"{source} is empty (0 bytes): the download or export failed; {WHAT_TO_GIVE}")
    name = p.name.lower()
    if name.endswith(VOLUME_EXTENSIONS):
        return _read_volume_file(p, source)
    if name.endswith(DICOM_EXTENSIONS) or _is_dicom(p):
        return _read_dicom_files([p], source, [])
    kind = _kind_of(p)
    if kind:
        raise InputError(f"{source} is {kind}, not a CT volume: {WHAT_TO_GIVE}")
    raise InputError(f"{source} has an unsupported file type '{p.suffix or p.name}': {WHAT_TO_GIVE}")


def scan_from_sitk(image: sitk.Image, source: str = "") -> Scan:
    """Validate a SimpleITK image as a CT in HU and convert it to a ``Scan``.

    Used by ``read_scan`` and by the Slicer module (which hands over its volume node as an image).
    2-D images become one slice; colour/vector images, non-HU intensities and constant images
    raise ``InputError``. The image's buffer is converted slice by slice to int16, so no float64
    copy of the volume is made.
    """
    import SimpleITK as sitk
    name = source or "the image"
    if image.GetNumberOfComponentsPerPixel() > 1:
        n = image.GetNumberOfComponentsPerPixel()
        what = "an RGB/colour picture" if n in (3, 4) else "a vector image"
        raise InputError(f"{name} has {n} values per pixel ({what}), not a CT in HU: {WHAT_TO_GIVE}")
    if "complex" in image.GetPixelIDTypeAsString():
        raise InputError(f"{name} has complex pixels, not a CT in HU: {WHAT_TO_GIVE}")
    notes: list[str] = []
    dim = image.GetDimension()
    if dim == 4:
        size = image.GetSize()
        if size[3] != 1:
            raise InputError(f"{name} is a 4-D image with {size[3]} time points/channels: give one 3-D CT volume")
        image = sitk.Extract(image, (size[0], size[1], size[2], 0), (0, 0, 0, 0))
        dim = 3
    if dim == 2:
        sx, sy = image.GetSpacing()
        ox, oy = image.GetOrigin()
        d = image.GetDirection()
        spacing = (float(sx), float(sy), 1.0)
        origin = (float(ox), float(oy), 0.0)
        direction = (d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0)
        notes.append("2-D image: read as a single slice")
    elif dim == 3:
        spacing = tuple(float(v) for v in image.GetSpacing())
        origin = tuple(float(v) for v in image.GetOrigin())
        direction = tuple(float(v) for v in image.GetDirection())
    else:
        raise InputError(f"{name} is a {dim}-D image: give a 3-D CT volume")
    view = sitk.GetArrayViewFromImage(image)
    if view.ndim == 2:
        view = view[None]
    elif dim == 3:
        view, spacing, direction = _axial(view, spacing, direction, name, notes)
    hu = np.empty(view.shape, dtype=np.int16)
    for z in range(view.shape[0]):
        hu[z] = _to_int16(view[z], name)
    del view
    return _finish(hu, spacing, origin, direction, source, notes)


#: Slice planes farther than this from axial are refused: CT gantries tilt at most about 30 degrees,
#: so a steeper plane is an oblique reformat, and the model was trained on axial patches.
MAX_OBLIQUE_DEG = 30.0
_PLANE_NAMES = {0: "sagittal", 1: "coronal", 2: "axial"}


def _dominant_patient_axis(*columns) -> int:
    """The patient axis (0 L-R, 1 A-P, 2 S-I) the normal of the plane spanned by ``columns`` runs along."""
    normal = np.cross(columns[0], columns[1])
    return int(np.argmax(np.abs(normal)))


def axial_axis_order(direction, name: str = "the scan") -> tuple:
    """The voxel axes (i, j, k) reordered so that slices (constant k) are the nearest to axial.

    (0, 1, 2) for an axial volume, whatever its in-plane flips or rotation. A volume stored
    sagittally or coronally gets the axis that runs head-foot as its slice axis, the left-right
    one as rows' direction (i) and the front-back one as columns' (j); the axes keep their signs.
    Raises ``InputError`` when the slices, once reordered, are still more than ``MAX_OBLIQUE_DEG``
    from axial.
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    dominant = [int(np.argmax(np.abs(d[:, c]))) for c in range(3)]
    if _dominant_patient_axis(d[:, 0], d[:, 1]) == 2:
        order = (0, 1, 2)
    elif sorted(dominant) == [0, 1, 2]:
        order = tuple(dominant.index(a) for a in range(3))
    else:
        order = None
    if order is not None:
        normal = np.cross(d[:, order[0]], d[:, order[1]])
        angle = math.degrees(math.acos(min(1.0, abs(normal[2]) / (np.linalg.norm(normal) or 1.0))))
    if order is None or angle > MAX_OBLIQUE_DEG:
        angle_text = "" if order is None else f" {angle:.0f} degrees from axial"
        raise InputError(f"{name} has oblique slices{angle_text} (more than {MAX_OBLIQUE_DEG:g} degrees): the model "
                         f"analyses axial patches; resample the scan to axial slices and give that volume")
    return order


def _axial(array: np.ndarray, spacing, direction, name: str, notes: list):
    """``array`` [z, y, x] with its spacing and direction, axes reordered to axial slices if needed (a view).

    Voxel [0, 0, 0] stays where it is; only the axes are relabelled, so the physical geometry (and
    every output written with it) is unchanged.
    """
    order = axial_axis_order(direction, name)
    if order == (0, 1, 2):
        return array, spacing, direction
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    stored = _PLANE_NAMES[_dominant_patient_axis(d[:, 0], d[:, 1])]
    notes.append(f"the volume is stored as {stored} slices: its axes were reordered to axial slices (the "
                 f"model's patches are axial); positions in patient space are unchanged")
    return (array.transpose([2 - order[2], 2 - order[1], 2 - order[0]]), tuple(spacing[k] for k in order),
            tuple(float(v) for v in d[:, list(order)].ravel()))


def place_slices(scan: Scan, slice_positions_mm, placed_by: str = "") -> Scan:
    """Give ``scan`` its true slice positions (mm along the slice normal from slice 0), e.g. those an
    interval series has under the acquisition transform Slicer's DICOM reader adds; None leaves it as is.

    ``placed_by`` names what placed the slices (the transform), for the note.
    """
    if slice_positions_mm is None:
        return scan
    positions = np.asarray(slice_positions_mm, dtype=float)
    if positions.shape != (scan.hu.shape[0],) or not np.all(np.isfinite(positions)) or np.any(np.diff(positions) <= 0):
        raise InputError(f"{scan.source or 'the scan'}: {positions.size} slice positions for {scan.hu.shape[0]} slices, "
                         "or not increasing: load the series again")
    gaps = np.diff(positions)
    scan.slice_positions_mm = tuple(float(v) for v in positions)
    where = f" by '{placed_by}'" if placed_by else ""
    scan.notes.append(f"slices are unevenly spaced ({gaps.min():.2f} to {gaps.max():.2f} mm apart, placed{where}): "
                      "each slice is analysed at its true position and the lung volume counts each slice as a "
                      "slab reaching halfway to its neighbours")
    return scan


def scan_from_array(hu: np.ndarray, spacing_mm, origin_mm=(0.0, 0.0, 0.0), direction=_IDENTITY,
                    source: str = "") -> Scan:
    """Wrap an HU array [z, y, x] (or one 2-D slice) as a validated ``Scan``.

    Parameters
    ----------
    hu : ndarray
        HU values; any real dtype. Copied to int16 (rounded, clipped); padding mapped to air.
    spacing_mm : (x, y, z) voxel size in mm ((x, y) for a 2-D slice: z becomes 1 mm).
    origin_mm : (x, y, z) LPS position of voxel [0, 0, 0] in mm; default (0, 0, 0).
    direction : 9 floats, row-major direction cosines; default identity.
    """
    arr = np.asarray(hu)
    name = source or "the array"
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise InputError(f"{name} has {arr.ndim} dimensions: give a 3-D [z, y, x] HU array")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating) or arr.dtype == bool):
        raise InputError(f"{name} has dtype {arr.dtype}: give real-valued HU")
    spacing = tuple(float(v) for v in spacing_mm)
    if len(spacing) == 2:
        spacing = spacing + (1.0,)
    if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise InputError(f"spacing {spacing_mm} mm is invalid: give three positive numbers (x, y, z)")
    origin = tuple(float(v) for v in origin_mm)
    if len(origin) == 2:
        origin = origin + (0.0,)
    direction = tuple(float(v) for v in np.asarray(direction, dtype=np.float64).ravel())
    if len(direction) != 9:
        raise InputError(f"direction has {len(direction)} values: give 9 (row-major 3x3)")
    out = np.empty(arr.shape, dtype=np.int16)
    for z in range(arr.shape[0]):
        out[z] = _to_int16(arr[z], name)
    return _finish(out, spacing, origin, direction, source, [])


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def _read_volume_file(p: Path, source: str) -> Scan:
    import SimpleITK as sitk
    name = p.name.lower()
    info = None
    if name.endswith((".nii", ".nii.gz")):
        info = _check_nifti_complete(p, source)
    else:
        _check_declared_size(p, source)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        kind = _kind_of(p)
        if kind:
            raise InputError(f"{source} is {kind} with a volume extension, not a CT volume: {WHAT_TO_GIVE}") from None
        reason = _short_reason(exc)
        if "spacing" in reason.lower() or "space vector" in reason.lower():
            raise InputError(f"{source} declares an invalid voxel size ({reason}): fix the header or export the "
                             f"scan again with its spacing") from None
        raise InputError(f"{source} could not be read ({reason}): the file is truncated or corrupt; "
                         f"export it again") from None
    scan = scan_from_sitk(image, source)
    note = _sform_note(info, image.GetSpacing()) if info else None
    if note:
        scan.notes.append(note)
    return scan


def _sform_note(info: dict, spacing_mm) -> Optional[str]:
    """A note when a NIfTI-1 sform scales the axes otherwise than the header's voxel size.

    ITK prints "unexpected scales in sform" to stderr for such a file (the command line keeps ITK's
    warnings off stderr) and takes the voxel size; the note says so, since one of the two is wrong.
    """
    scales = info.get("sform_scales")
    if not scales:
        return None
    pixdim = [abs(float(v)) for v in info["pixdim"][:len(scales)]]
    if all(abs(a - b) <= 1e-3 * max(b, 1e-6) for a, b in zip(scales, pixdim)):
        return None
    fmt = lambda values: " x ".join(f"{v:g}" for v in values)  # noqa: E731
    return (f"the NIfTI header's sform scales the axes by {fmt(scales)} mm but declares a voxel size of "
            f"{fmt(pixdim)} mm; the voxel size was used ({fmt(spacing_mm)} mm): check the scan's spacing")


def _check_nifti_complete(p: Path, source: str) -> dict:
    """What ITK's NIfTI reader lets through silently, refused here from the header and the bytes.

    ITK fills a truncated file with zeros, turns a voxel size of 0 or NaN into 1 mm, and reads
    NaN/inf voxels as 0; each is refused with its reason.
    """
    gz = p.name.lower().endswith(".gz")
    try:
        opener = gzip.open if gz else open
        with opener(p, "rb") as fh:
            head = fh.read(540)
    except PermissionError:
        raise InputError(f"{source} cannot be opened (permission denied): check the file's permissions") from None
    except (OSError, EOFError, zlib.error):
        raise InputError(f"{source} is not a readable NIfTI file (bad gzip compression): "
                         f"copy or export it again") from None
    info = _nifti_header(head)
    if info is None:
        raise InputError(f"{source} does not start with a NIfTI header: the file is corrupt or mislabelled; "
                         f"{WHAT_TO_GIVE}")
    expected = info["expected"]
    for axis, value in zip("xyz", info["pixdim"][:min(info["ndim"], 3)]):
        if not math.isfinite(value) or value <= 0:
            raise InputError(f"{source} declares a voxel size of {value:g} mm along {axis} (NIfTI pixdim): "
                             f"fix the header or export the scan again with its spacing")
    if not gz:
        if p.stat().st_size < expected:
            raise InputError(f"{source} is truncated ({p.stat().st_size} of {expected} bytes): copy or export it again")
    else:
        # gzip stores the uncompressed size (mod 2^32) in its last 4 bytes; only when that disagrees is
        # the whole stream decompressed (chunk by chunk, nothing kept) to tell truncation from oddities.
        with open(p, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            isize = struct.unpack("<I", fh.read(4))[0]
        if isize != expected % (1 << 32):
            total = 0
            try:
                with gzip.open(p, "rb") as fh:
                    while True:
                        chunk = fh.read(1 << 24)
                        if not chunk:
                            break
                        total += len(chunk)
            except (EOFError, OSError, zlib.error):
                raise InputError(f"{source} is truncated or corrupt (the compressed data ends early): "
                                 f"copy or export it again") from None
            if total < expected:
                raise InputError(f"{source} is truncated ({total} of {expected} bytes): copy or export it again")
    if info["float_dtype"] is not None:
        _check_nifti_finite(p, gz, info, source)
    return info


def _check_nifti_finite(p: Path, gz: bool, info: dict, source: str) -> None:
    """Refuse NaN/inf voxels, which ITK's NIfTI reader turns into 0 (as NRRD/MHA already are refused)."""
    dtype = np.dtype(info["float_dtype"]).newbyteorder(info["endian"])
    item = dtype.itemsize
    opener = gzip.open if gz else open
    try:
        with opener(p, "rb") as fh:
            fh.seek(info["offset"]) if not gz else fh.read(info["offset"])
            left = info["expected"] - info["offset"]
            while left > 0:
                chunk = fh.read(min(left, (1 << 24) // item * item))
                if not chunk:
                    break
                left -= len(chunk)
                values = np.frombuffer(chunk[:len(chunk) // item * item], dtype=dtype)
                if not np.isfinite(values).all():
                    raise InputError(f"{source} contains NaN or infinite values: give a CT volume in HU "
                                     f"(fill them, e.g. with -1000 HU for air, and export it again)")
    except (EOFError, OSError, zlib.error):
        raise InputError(f"{source} is truncated or corrupt (the compressed data ends early): "
                         f"copy or export it again") from None


def _nifti_header(head: bytes) -> Optional[dict]:
    """Sizes, voxel size, data offset and float type from a NIfTI-1/2 header; None if it is not one."""
    if len(head) < 348:
        return None
    for endian in "<>":
        size = struct.unpack(endian + "i", head[:4])[0]
        if size == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            datatype = struct.unpack(endian + "h", head[70:72])[0]
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            pixdim = struct.unpack(endian + "8f", head[76:108])
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            sform_code = struct.unpack(endian + "h", head[254:256])[0]
            srow = struct.unpack(endian + "12f", head[280:328])
            break
        if size == 540 and len(head) >= 540:
            datatype = struct.unpack(endian + "h", head[12:14])[0]
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            dims = struct.unpack(endian + "8q", head[16:80])
            pixdim = struct.unpack(endian + "8d", head[104:168])
            offset = int(struct.unpack(endian + "q", head[168:176])[0])
            sform_code, srow = 0, ()  # NIfTI-2: not checked
            break
    else:
        return None
    ndim = int(dims[0])
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    n = 1
    for d in dims[1:ndim + 1]:
        n *= max(int(d), 1)
    offset = max(offset, 348)
    scales = None
    if sform_code > 0 and ndim >= 3 and all(math.isfinite(v) for v in srow):
        # Column norms of the sform's 3x3 part: the voxel size the sform implies along i, j, k.
        scales = [math.sqrt(srow[c] ** 2 + srow[4 + c] ** 2 + srow[8 + c] ** 2) for c in range(3)]
    return {"expected": offset + n * bitpix // 8, "offset": offset, "ndim": ndim, "pixdim": pixdim[1:4],
            "endian": endian, "float_dtype": {16: "f4", 64: "f8"}.get(int(datatype)), "sform_scales": scales}


def _nifti_expected_bytes(head: bytes) -> Optional[int]:
    info = _nifti_header(head)
    return None if info is None else info["expected"]


def _check_declared_size(p: Path, source: str) -> None:
    """Refuse an NRRD/MetaImage whose header declares more voxels than the file can hold, before reading them.

    ITK allocates the declared size first (a 2 KB NRRD declaring 1024^3 takes 2 GB before failing)
    and reports a missing detached data file as "No such file or directory". Deflate cannot
    compress more than about 1032:1, so compressed data smaller than that fraction is truncated too.
    """
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return  # read_scan's full read says why
    size = tuple(int(v) for v in reader.GetSize())
    voxels = int(np.prod(size, dtype=np.float64)) * int(reader.GetNumberOfComponents())
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    bits = next((int(w.split("-")[0]) for w in pixel.split() if w.endswith("-bit") and w.split("-")[0].isdigit()), 8)
    declared = voxels * bits // 8
    data_file, compressed, header_bytes = _declared_data(p)
    if data_file is None:
        return
    if not data_file.is_file():
        raise InputError(f"{source} keeps its voxels in {data_file.name}, which is missing: put it beside "
                         f"{p.name} (or export the scan as one .nrrd/.mha file)")
    available = data_file.stat().st_size - (header_bytes if data_file == p else 0)
    capacity = available * 1100 if compressed else available
    if declared > capacity:
        shape = "x".join(str(v) for v in size)
        raise InputError(f"{source} declares {shape} voxels ({_human_bytes(declared)}) but holds only "
                         f"{_human_bytes(max(available, 0))} of voxel data: the file is truncated or its header is "
                         f"wrong; export it again")


def _declared_data(p: Path) -> tuple[Optional[Path], bool, int]:
    """(file holding the voxels, compressed?, header length) from an NRRD or MetaImage text header."""
    try:
        with open(p, "rb") as fh:
            raw = fh.read(65536)
    except OSError:
        return None, False, 0
    name = p.name.lower()
    if name.endswith((".nrrd", ".nhdr")):
        end = raw.find(b"\n\n")
        header = raw[:end if end >= 0 else len(raw)].decode("latin-1")
        fields = {}
        for line in header.splitlines():
            if ":" in line and not line.startswith("#"):
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.strip().lstrip("=").strip()
        encoding = fields.get("encoding", "raw").lower()
        if encoding not in ("raw", "gzip", "gz", "bzip2", "bz2"):
            return None, False, 0  # text/hex encodings: sizes are not comparable
        detached = fields.get("data file") or fields.get("datafile")
        if detached:
            if detached.split()[0].upper() == "LIST" or "%" in detached or len(detached.split()) > 1:
                return None, False, 0
            return p.parent / detached, encoding != "raw", 0
        if end < 0:
            return None, False, 0
        return p, encoding != "raw", end + 2
    fields, header_bytes = {}, 0
    for line in raw.split(b"\n"):
        header_bytes += len(line) + 1
        text = line.decode("latin-1")
        if "=" in text:
            key, value = text.split("=", 1)
            fields[key.strip().lower()] = value.strip()
            if key.strip().lower() == "elementdatafile":
                break
    target = fields.get("elementdatafile")
    if not target or target.upper() == "LIST" or "%" in target or len(target.split()) > 1:
        return None, False, 0
    compressed = fields.get("compresseddata", "false").lower() == "true"
    if target.upper() == "LOCAL":
        return p, compressed, header_bytes
    return p.parent / target, compressed, 0


def _human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} GB"


def _kind_of(p: Path) -> Optional[str]:
    """What a non-CT file is, from its extension or its first bytes (for the error message)."""
    kind = _OTHER_KINDS.get(p.suffix.lower())
    if kind:
        return kind
    try:
        with open(p, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return None
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file"
    return None


def _is_dicom(p: Path) -> bool:
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _short_reason(exc: Exception) -> str:
    """The last meaningful line of a SimpleITK/ITK error, trimmed to one short line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    reason = lines[-1] if lines else type(exc).__name__
    for prefix in ("sitk::ERROR:", "itk::ERROR:"):
        if prefix in reason:
            reason = reason.split(prefix, 1)[1].strip()
    return reason[:120].rstrip(" .")


# ----------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------
@dataclass
class _Slice:
    path: Path
    size: tuple
    spacing: tuple
    origin: np.ndarray
    direction: tuple
    modality: str
    series: str
    thickness: Optional[float]
    localizer: bool


def dicom_header(path) -> Optional["sitk.ImageFileReader"]:
    """A GDCM reader holding ``path``'s header (no pixels), or None when it cannot be read as DICOM."""
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader


def _read_header(path: Path) -> Optional[_Slice]:
    reader = dicom_header(path)
    if reader is None:
        return None

    def tag(key: str) -> str:
        return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""

    thickness = None
    try:
        thickness = float(tag(_TAG_THICKNESS)) if tag(_TAG_THICKNESS) else None
    except ValueError:
        thickness = None
    return _Slice(path=path, size=tuple(reader.GetSize()), spacing=tuple(reader.GetSpacing()),
                  origin=np.asarray(reader.GetOrigin(), dtype=np.float64),
                  direction=tuple(round(v, 4) for v in reader.GetDirection()),
                  modality=tag(_TAG_MODALITY).upper(), series=tag(_TAG_SERIES),
                  thickness=thickness, localizer="LOCALIZER" in tag(_TAG_IMAGE_TYPE).upper())


def _read_dicom_folder(folder: Path, source: str) -> Scan:
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
    if not files:
        sub = [d.name for d in folder.iterdir() if d.is_dir()]
        hint = f" (it has sub-folders {sub[:3]}: give the one with the slices)" if sub else ""
        raise InputError(f"{source} is an empty folder{hint}: {WHAT_TO_GIVE}")
    volumes = [f for f in files if f.name.lower().endswith(VOLUME_EXTENSIONS)]
    read = [(f, _read_header(f)) for f in files]
    headers = [h for _, h in read if h is not None]
    damaged = [f for f, h in read if h is None and _damaged_slice(f, headers)]
    if damaged and headers:
        # A slice that looks like DICOM but cannot be read is a hole in the series, not a stray file.
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        raise InputError(f"DICOM slice {damaged[0]}{more} in {source} cannot be read (truncated or corrupt): "
                         f"export the series again, or remove the file to analyse the series without it")
    if not headers:
        if len(volumes) == 1:
            raise InputError(f"{source} holds no DICOM files but one volume file: give {volumes[0]} itself")
        raise InputError(f"no DICOM files found in folder {source}: give the folder that holds the series' "
                         f"slices, or a NIfTI/NRRD/MHA file")
    notes: list[str] = []
    skipped = len(files) - len(headers)
    if skipped:
        notes.append(f"{skipped} non-DICOM file(s) in the folder ignored")
    return _read_dicom_headers(headers, source, notes)


def _damaged_slice(path: Path, headers: list) -> bool:
    """An unreadable file that belongs to a series beside it: it names one of their series UIDs, or it
    looks like DICOM and is much smaller than the slices (cut off). Other DICOM objects (reports,
    DICOMDIR) name no series here and are ignored as before."""
    if not headers or path.name.upper() == "DICOMDIR":
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(65536)
        size = path.stat().st_size
    except OSError:
        return True
    if any(h.series and h.series.encode("ascii", "ignore") in head for h in headers):
        return True
    looks_dicom = path.name.lower().endswith(DICOM_EXTENSIONS) or head[128:132] == b"DICM"
    typical = float(np.median([h.path.stat().st_size for h in headers[:50]]))
    return looks_dicom and size < 0.5 * typical


def _read_dicom_files(files: Sequence[Path], source: str, notes: list) -> Scan:
    headers = []
    for f in files:
        h = _read_header(Path(f))
        if h is None:
            kind = _kind_of(Path(f))
            what = f"is {kind}, not a DICOM slice" if kind else "is not a readable DICOM file (truncated or corrupt)"
            raise InputError(f"{f} {what}: {WHAT_TO_GIVE}")
        headers.append(h)
    return _read_dicom_headers(headers, source, list(notes))


def _read_dicom_headers(headers: list, source: str, notes: list) -> Scan:
    import SimpleITK as sitk
    if len(headers) == 1 and len(headers[0].size) == 3 and headers[0].size[2] > 1:
        return _read_multiframe(headers[0], source, notes)
    by_series: dict[str, list] = {}
    for h in headers:
        by_series.setdefault(h.series, []).append(h)
    non_ct = {s: hs for s, hs in by_series.items() if hs[0].modality not in ("", "CT")}
    candidates = {s: hs for s, hs in by_series.items() if s not in non_ct}
    if not candidates:
        modality = Counter(h.modality for h in headers).most_common(1)[0][0]
        raise InputError(f"{source} is a {modality} DICOM series, not CT: give a CT series in HU")
    series, chosen = max(candidates.items(), key=lambda kv: len(kv[1]))
    if len(by_series) > 1:
        notes.append(f"{len(by_series)} DICOM series found; using the one with {len(chosen)} slices")
    if non_ct and len(by_series) > 1:
        notes.append(f"{sum(len(v) for v in non_ct.values())} non-CT slice(s) ignored")
    # Localizers and odd-sized images share the series UID on some scanners: keep the main stack.
    kept = [h for h in chosen if not h.localizer] or chosen
    layout = Counter((h.size, h.direction) for h in kept).most_common(1)[0][0]
    stack = [h for h in kept if (h.size, h.direction) == layout]
    if len(stack) < len(chosen):
        notes.append(f"{len(chosen) - len(stack)} slice(s) with another size or orientation (e.g. a localizer) ignored")
    direction = np.asarray(layout[1], dtype=np.float64).reshape(3, 3)
    row_axis, col_axis = direction[:, 0], direction[:, 1]
    normal = np.cross(row_axis, col_axis)
    positions = np.array([float(h.origin @ normal) for h in stack])
    order = np.argsort(positions, kind="stable")
    stack = [stack[i] for i in order]
    positions = positions[order]
    keep = np.concatenate([[True], np.diff(positions) > 1e-3])
    if not keep.all():
        notes.append(f"{int((~keep).sum())} duplicate slice(s) at the same position ignored")
        stack = [h for h, k in zip(stack, keep) if k]
        positions = positions[keep]
    sx, sy = float(stack[0].spacing[0]), float(stack[0].spacing[1])
    offsets = positions - positions[0]
    shifts_mm = _in_plane_shifts(stack, row_axis, col_axis, offsets, source, notes)
    thickness = stack[0].thickness
    slice_positions = None
    if len(stack) > 1:
        gaps = np.diff(offsets)
        spacing_z = float(np.median(gaps))
        if gaps.max() - gaps.min() > max(0.01, 0.05 * spacing_z):
            # Interval HRCT (thin slices 1 mm then 9 mm apart) or an irregular series: every slice
            # keeps its own position; spacing_z is only a nominal value for 3-D morphology.
            slice_positions = tuple(float(v) for v in offsets)
            spacing_z = float(offsets[-1]) / (len(stack) - 1)
            step, _, worst = geometry.uniform_grid(offsets)
            placed = f" (slices up to {worst:.2f} mm from a plane)" if worst > 0.05 else ""
            notes.append(f"slices are unevenly spaced ({gaps.min():.2f} to {gaps.max():.2f} mm apart, e.g. an interval "
                         f"HRCT): each slice is analysed at its true position; the lung volume counts each slice as a "
                         f"slab reaching halfway to its neighbours; heatmap.nii.gz and lung_mask.nii.gz are written on "
                         f"a regular {step:.3g} mm grid where planes between acquired slices copy the nearest "
                         f"one{placed}")
        sparse_gap = float(np.median(gaps))
        if thickness and sparse_gap > 2.0 * thickness:
            notes.append(f"slices are {sparse_gap:.1f} mm apart but {thickness:.2f} mm thick: a sparse series, "
                         f"the lung mask and patches use the slices as they are")
    else:
        spacing_z = float(thickness) if thickness and thickness > 0 else 1.0
        notes.append(f"a single DICOM slice: read as a volume of one slice ({spacing_z:g} mm thick)")
    ny, nx = int(layout[0][1]), int(layout[0][0])
    hu = np.empty((len(stack), ny, nx), dtype=np.int16)
    for z, h in enumerate(stack):
        try:
            image = sitk.ReadImage(str(h.path), imageIO="GDCMImageIO")
        except RuntimeError as exc:
            raise InputError(f"DICOM slice {h.path} could not be read ({_short_reason(exc)}): "
                             f"the file is truncated or corrupt; export the series again") from None
        if image.GetNumberOfComponentsPerPixel() > 1:
            raise InputError(f"{source} holds colour DICOM images (e.g. screenshots), not CT slices: "
                             f"give the original CT series")
        arr = sitk.GetArrayViewFromImage(image)
        if arr.size != ny * nx:
            raise InputError(f"DICOM slice {h.path} holds {arr.size} pixels where its header declares {nx}x{ny}: "
                             f"the file is truncated or corrupt; export the series again")
        hu[z] = _to_int16(arr.reshape(ny, nx), source)
        if shifts_mm is not None and np.any(np.abs(shifts_mm[z]) > 1e-3):
            hu[z] = _shift_slice(hu[z], shifts_mm[z][1] / sy, shifts_mm[z][0] / sx)
    origin = tuple(float(v) for v in stack[0].origin)
    spacing = (sx, sy, spacing_z)
    direction_t = tuple(float(v) for v in direction.ravel())
    if len(stack) > 1 and axial_axis_order(direction_t, source) != (0, 1, 2):
        if slice_positions is not None:
            raise InputError(f"{source} is a sagittal or coronal series with uneven gaps between slices: "
                             f"give an axial series (or one with even gaps)")
        view, spacing, direction_t = _axial(hu, spacing, direction_t, source, notes)
        hu = np.ascontiguousarray(view)
    scan = _finish(hu, spacing, origin, direction_t, source, notes)
    scan.slice_positions_mm = slice_positions
    if shifts_mm is None and direction_t == tuple(float(v) for v in direction.ravel()):  # on the source planes
        scan.dicom_files = tuple(str(h.path) for h in stack)
    return scan


#: Largest gantry tilt (degrees) resampled; CT gantries tilt up to about 30 degrees.
MAX_GANTRY_TILT_DEG = 30.0


def _in_plane_shifts(stack: list, row_axis: np.ndarray, col_axis: np.ndarray, offsets: np.ndarray, source: str,
                     notes: list) -> Optional[np.ndarray]:
    """(n, 2) in-plane offsets (along rows, along columns; mm) of each slice's corner from slice 0's, or None.

    Slices of an ordinary series are stacked along their normal. With gantry tilt they are stacked
    along the table while the image planes are tilted, so each slice is shifted in its own plane
    (ITK and the DICOM standard's geometry place it there; readers that use one origin and one
    normal put it up to tens of mm off). Those shifts are undone slice by slice, which shears the
    stack onto a rectilinear grid in patient space.
    """
    if len(stack) < 2:
        return None
    delta = np.array([h.origin - stack[0].origin for h in stack])
    shifts = np.stack([delta @ row_axis, delta @ col_axis], axis=1)
    pixel = min(float(stack[0].spacing[0]), float(stack[0].spacing[1]))
    if np.abs(shifts).max() <= 0.5 * pixel:
        return None  # rounding in the headers, or a tilt too small to move any slice by half a pixel
    # Slope of the in-plane shift against the distance along the normal: the tilt angle.
    reach = np.abs(offsets[-1]) or 1.0
    slope = np.hypot(*(shifts[-1] - shifts[0])) / reach
    tilt_deg = math.degrees(math.atan(slope))
    residual = shifts - np.outer(offsets / reach, shifts[-1] - shifts[0])
    if np.abs(residual).max() > max(0.5, 2 * pixel):
        raise InputError(f"slices of {source} are shifted sideways by irregular amounts (up to "
                         f"{np.abs(residual).max():.1f} mm off a straight stack): not one volume; "
                         f"export the series again")
    if tilt_deg > MAX_GANTRY_TILT_DEG:
        raise InputError(f"{source} has a gantry tilt of {tilt_deg:.1f} degrees (more than {MAX_GANTRY_TILT_DEG:g}): "
                         f"reformat it to axial slices on the scanner or workstation and give that series")
    notes.append(f"gantry tilt of {tilt_deg:.1f} degrees: each slice was shifted in its plane (up to "
                 f"{np.hypot(shifts[:, 0], shifts[:, 1]).max():.1f} mm, linear interpolation) onto a rectilinear grid "
                 f"in patient space; pixels shifted in from outside the field of view are air")
    return shifts


def _shift_slice(slice_hu: np.ndarray, rows_px: float, cols_px: float) -> np.ndarray:
    """One slice moved by (rows, cols) pixels, linear interpolation, air where nothing was acquired."""
    from scipy import ndimage
    moved = ndimage.shift(slice_hu.astype(np.float32), (rows_px, cols_px), order=1, mode="constant", cval=AIR_HU)
    return np.clip(np.rint(moved), -32768, 32767).astype(np.int16)


def _read_multiframe(header: "_Slice", source: str, notes: list) -> Scan:
    """A multi-frame DICOM file already holds a whole volume with its geometry."""
    import SimpleITK as sitk
    if header.modality not in ("", "CT"):
        raise InputError(f"{source} is a {header.modality} DICOM file, not CT: give a CT series in HU")
    try:
        image = sitk.ReadImage(str(header.path), imageIO="GDCMImageIO")
    except RuntimeError as exc:
        raise InputError(f"{source} could not be read ({_short_reason(exc)}): the file is truncated or corrupt") from None
    scan = scan_from_sitk(image, source)
    scan.notes[:0] = notes
    return scan


# ----------------------------------------------------------------------------------------------
# Validation and padding
# ----------------------------------------------------------------------------------------------
def _to_int16(values: np.ndarray, name: str) -> np.ndarray:
    """One slice to int16 HU (rounded, clipped); refuses NaN/inf."""
    if values.dtype == np.int16:
        return values
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all():
            raise InputError(f"{name} contains NaN or infinite values: give a CT volume in HU")
        return np.clip(np.rint(values), -32768, 32767).astype(np.int16)
    if values.dtype == bool or values.dtype.itemsize < 2:
        # (u)int8 and bool fit in int16; NumPy 2 refuses to compare them with 32767.
        return values.astype(np.int16)
    if np.issubdtype(values.dtype, np.unsignedinteger):
        return np.minimum(values, 32767).astype(np.int16)
    return np.clip(values, -32768, 32767).astype(np.int16)


def _map_padding(hu: np.ndarray) -> tuple[int, Optional[int], list]:
    """Set scanner padding and pasted constant frames to air, in place, slice by slice.

    Returns (number of padding voxels, lowest padding value, frame values found).
    """
    n_pad = 0
    lowest: Optional[int] = None
    frames: list = []
    for z in range(hu.shape[0]):
        s = hu[z]
        pad = s <= PADDING_HU
        count = int(np.count_nonzero(pad))
        if count:
            low = int(s.min())
            lowest = low if lowest is None else min(lowest, low)
            s[pad] = AIR_HU
            n_pad += count
        frame = _constant_frame(s)
        if frame is not None:
            value, (top, bottom, left, right) = frame
            if value > -900:  # an air-like frame needs no change
                s[:top] = AIR_HU
                s[s.shape[0] - bottom:] = AIR_HU
                s[:, :left] = AIR_HU
                s[:, s.shape[1] - right:] = AIR_HU
                frames.append(value)
    return n_pad, lowest, frames


def _constant_frame(s: np.ndarray):
    """(value, widths) of a constant band on all four sides of a slice, else None.

    Whole rows/columns of one exact value on every side are not anatomy (noise alone rules that
    out): they are a canvas the image was pasted onto.
    """
    if s.shape[0] < 3 or s.shape[1] < 3:
        return None
    value = s[0, 0]
    rows = (s == value).all(axis=1)
    cols = (s == value).all(axis=0)
    if rows.all():
        return None

    def run(flags: np.ndarray) -> int:
        off = np.flatnonzero(~flags)
        return int(off[0]) if off.size else flags.size

    widths = (run(rows), run(rows[::-1]), run(cols), run(cols[::-1]))
    if min(widths) < 1:
        return None
    return int(value), widths


def _finish(hu: np.ndarray, spacing, origin, direction, source: str, notes: list) -> Scan:
    name = source or "the image"
    if hu.size == 0 or min(hu.shape) == 0:
        raise InputError(f"{name} has no voxels (shape {hu.shape}): {WHAT_TO_GIVE}")
    _check_spacing(spacing, name)
    lo, hi = int(hu.min()), int(hu.max())
    if lo == hi:
        raise InputError(f"{name} is a constant image (every voxel is {lo}): give a CT volume with anatomy in it")
    n_pad, lowest, frames = _map_padding(hu)
    if n_pad:
        notes.append(f"{n_pad} padding voxel(s) outside the field of view (down to {lowest} HU) set to "
                     f"{AIR_HU} HU (air)")
    if frames:
        notes.append(f"a constant {Counter(frames).most_common(1)[0][0]} HU frame around {len(frames)} slice(s) "
                     f"(pasted canvas) set to {AIR_HU} HU (air)")
    _check_hu(hu, name, lo, hi)
    return Scan(hu=hu, spacing_mm=tuple(float(v) for v in spacing), origin_mm=tuple(float(v) for v in origin),
                direction=tuple(float(v) for v in direction), source=source, notes=notes)


#: Plausible voxel sizes (mm) of a chest CT: specimen micro-CT reaches 0.05 mm; sparse or thick-slab
#: series reach 10-20 mm between slices. Outside this range the header is wrong (a unit error, a
#: missing value read as 0), and lung volumes and patch sizes would be off by orders of magnitude.
MIN_SPACING_MM = 0.05
MAX_SPACING_MM = 30.0


def _check_spacing(spacing, name: str) -> None:
    for axis, value in zip("xyz", spacing):
        if not math.isfinite(value) or value <= 0:
            raise InputError(f"{name} has a voxel size of {value:g} mm along {axis}: fix the header or export the "
                             f"scan again with its spacing")
        if not MIN_SPACING_MM <= value <= MAX_SPACING_MM:
            raise InputError(f"{name} has a voxel size of {value:g} mm along {axis}, outside the {MIN_SPACING_MM:g}-"
                             f"{MAX_SPACING_MM:g} mm of a chest CT: the header's spacing is wrong (a unit error?); "
                             f"fix it or export the scan again")


def _check_hu(hu: np.ndarray, name: str, lo: int, hi: int) -> None:
    """Refuse intensities that are not CT Hounsfield units.

    A CT in HU has air (outside the body, in the lungs or bowel) near -1000 HU; MR, PET, photos
    and raw detector values have no negative values or nothing darker than -500. The statistics
    are taken on a strided sample so a large scan costs no extra memory.
    """
    step = max(1, int(round((hu.size / 2e6) ** (1 / 3))))
    sample = hu[::step, ::step, ::step]
    air = float(np.count_nonzero(sample <= AIR_OR_LUNG_HU)) / sample.size
    if air < MIN_AIR_FRACTION:
        if lo >= 0:
            raise InputError(f"intensities {lo}..{hi} in {name} look like MR or non-HU data (nothing below 0, no air "
                             f"near -1000 HU): give a CT in Hounsfield units")
        raise InputError(f"{name} has no air or lung (intensities {lo}..{hi}, nothing below {AIR_OR_LUNG_HU} HU): "
                         f"this is not a CT in Hounsfield units of the chest; give a chest CT")
    median = float(np.median(sample))
    if median > 1500:
        raise InputError(f"intensities in {name} have a median of {median:.0f}, too bright for HU: "
                         f"give a CT in Hounsfield units (DICOM rescale applied)")
