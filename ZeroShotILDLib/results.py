"""The one results type shared by the command line, the Slicer module and training."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .settings import AnalysisSettings


@dataclass
class PatchSet:
    """Candidate patches: square in-plane boxes on axial slices, in voxel indices of the scan.

    Box ``i`` covers ``hu[slice_index[i], row0[i]:row0[i]+size_rows, col0[i]:col0[i]+size_cols]``.
    """

    slice_index: np.ndarray  # (N,) int, z
    row0: np.ndarray  # (N,) int, y of the top-left voxel
    col0: np.ndarray  # (N,) int, x of the top-left voxel
    size_rows: int  # box side along y in voxels
    size_cols: int  # box side along x in voxels
    lung_fraction: np.ndarray  # (N,) float in [0, 1]
    center_ras_mm: np.ndarray  # (N, 3) RAS centre of each box

    def __len__(self) -> int:
        return int(self.slice_index.shape[0])

    def subset(self, indices: np.ndarray) -> "PatchSet":
        return PatchSet(
            self.slice_index[indices], self.row0[indices], self.col0[indices], self.size_rows, self.size_cols,
            self.lung_fraction[indices], self.center_ras_mm[indices],
        )


@dataclass
class AnalysisResult:
    settings: AnalysisSettings
    model_name: str
    #: False when the model's scores say nothing about this scan (random weights; a phantom-trained
    #: model on a real scan): every output then says so, with ``model_warning`` as the reason.
    model_meaningful: bool
    source: str
    shape_zyx: tuple
    spacing_mm: tuple
    lung_mask: np.ndarray  # bool [z,y,x]
    lung_volume_ml: float
    patches: PatchSet  # every candidate
    patch_probabilities: dict  # prompt -> (N,) P(prompt) per candidate
    ranked: np.ndarray  # indices into ``patches`` of the top_k for the first prompt, best first
    montage_indices: np.ndarray  # indices of the n*n patches in the montage, row-major
    montage: np.ndarray  # uint8 (S, S) montage image at the model's input size
    finding_probabilities: dict  # prompt -> montage-level probability
    subtype_probabilities: dict  # subtype name -> montage-level probability
    notes: list = field(default_factory=list)
    timings_s: dict = field(default_factory=dict)
    #: How many candidates were encoded at full resolution (== len(patches) in exact mode).
    encoded_exactly: Optional[int] = None
    #: One line saying why the scores are not meaningful ("" when they are); see :func:`model_warning`.
    model_warning: str = ""
    #: prompt -> extent record (``extent.extent_summary``: lung_fraction, by_zone, predominance, rule).
    extent: dict = field(default_factory=dict)
    #: The pattern map (``patterns.PatternMap``: a label per candidate, names, colours, extent per pattern); None when off.
    patterns: Optional[object] = None
    #: Scored lung volume (mL) per zone and the zone geometry (``extent``), shared by all prompts.
    zones: dict = field(default_factory=dict)

    @property
    def primary_prompt(self) -> str:
        return self.settings.prompts[0]


#: How a scan made by ``ZeroShotILDLib.phantom`` names itself (``Scan.source``, a volume node's name, the
#: ``phantom_0001.nii.gz`` files of a phantom data set): everything else counts as a real scan.
PHANTOM_SOURCE_PREFIX = "phantom"


def is_phantom_source(source: str) -> bool:
    """True when ``source`` (a scan's source string or file path) names a synthetic phantom."""
    name = str(source or "").replace("\\", "/").rsplit("/", 1)[-1]
    return name.strip().lower().startswith(PHANTOM_SOURCE_PREFIX)


def model_warning(model_name: str, *, random_weights: bool, trained_on: str, source: str) -> str:
    """Why ``model_name``'s scores say nothing about the scan ``source``, or "" when they can.

    ``trained_on`` is the model list's field of that name: "phantoms" for models that never saw a
    real CT (the demo model), "" otherwise.
    """
    if random_weights:
        return f"model '{model_name}' has random weights: its scores are meaningless"
    if trained_on == "phantoms" and not is_phantom_source(source):
        return (f"model '{model_name}' was trained on synthetic phantoms only: its scores on a real scan are "
                "meaningless (choose a CT or chest X-ray model)")
    return ""
