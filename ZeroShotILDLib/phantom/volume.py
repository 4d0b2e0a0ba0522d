"""The ``Phantom`` record: a volume with its ground truth."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import InputError

@dataclass
class Phantom:
    """A synthetic chest CT with its ground truth.

    Attributes
    ----------
    hu : ndarray of int16, shape (z, y, x)
        Hounsfield units.
    spacing_mm : tuple of 3 floats
        Voxel spacing ``(x, y, z)`` in mm, as SimpleITK reports it.
    origin_mm : tuple of 3 floats
        LPS position ``(x, y, z)`` in mm of voxel ``[0, 0, 0]``; the volume is centred on 0.
    direction : tuple of 9 floats
        Identity direction cosines.
    lung_mask : ndarray of bool, shape (z, y, x)
        Both lungs: parenchyma with the vessels, small airways and disease inside them; not the
        trachea, main bronchi, mediastinum or chest wall.
    disease_mask : ndarray of bool, shape (z, y, x)
        Union of all ILD pattern regions; a subset of ``lung_mask``; empty for normal phantoms.
    airway_mask : ndarray of bool, shape (z, y, x)
        Lumen of the trachea and the two main bronchi.
    body_mask : ndarray of bool, shape (z, y, x)
        The patient: inside the skin (a read-only broadcast view; the body does not change along z).
    labels : dict
        ``{"ild": bool, "subtype": str or None, "patterns": [str, ...], "seed": int,
        "benign": [str, ...], "disease_fraction": float, "involvement": float or None}``;
        ``patterns`` are names from ``PATTERNS`` actually drawn, ``benign`` lists non-ILD
        findings (normal phantoms only), ``disease_fraction`` is the share of ``lung_mask`` inside
        ``disease_mask`` and ``involvement`` the share that was asked for (None: the style's own
        draw, 12-30 %).
    report : str
        Synthetic radiology report (FINDINGS with four sections, then IMPRESSION).
    pattern_masks : dict of str -> ndarray of bool, shape (z, y, x)
        The region of each pattern drawn (keys: the names in ``labels["patterns"]``), each a
        subset of ``disease_mask``: "reticulation" the zone where the net of lines shows,
        "ground-glass opacity" where the ground glass is at least 30 % of its full density,
        "honeycombing" the cyst clusters (lumina and shared walls), "traction bronchiectasis" the
        dilated airways with their walls, "centrilobular nodules" the nodules, "mosaic
        attenuation" the dark lobules. A pattern not drawn has no key (use ``pattern_mask``).
    """

    hu: np.ndarray
    spacing_mm: tuple
    origin_mm: tuple
    direction: tuple
    lung_mask: np.ndarray
    disease_mask: np.ndarray
    airway_mask: np.ndarray
    labels: dict
    report: str
    body_mask: Optional[np.ndarray] = None
    pattern_masks: dict = field(default_factory=dict)

    def pattern_mask(self, name: str) -> np.ndarray:
        """The region of pattern ``name`` (one of ``PATTERNS``); all False when it was not drawn."""
        mask = self.pattern_masks.get(name)
        return mask if mask is not None else np.zeros(self.lung_mask.shape, dtype=bool)

    def to_sitk(self):
        """Return the volume as an int16 ``SimpleITK.Image`` with spacing, origin and direction."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(self.hu, dtype=np.int16))
        image.SetSpacing(tuple(float(v) for v in self.spacing_mm))
        image.SetOrigin(tuple(float(v) for v in self.origin_mm))
        image.SetDirection(tuple(float(v) for v in self.direction))
        return image

    def save(self, path) -> None:
        """Write the volume to ``path``; the extension picks the format (.nii.gz, .nrrd, .mha, ...)."""
        import SimpleITK as sitk

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            sitk.WriteImage(self.to_sitk(), str(path), True)
        except RuntimeError as exc:
            raise InputError(
                f"Cannot write phantom to {path}: use an extension SimpleITK writes "
                f"(.nii.gz, .nrrd, .mha)."
            ) from exc
