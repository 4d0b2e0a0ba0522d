"""Names, labels and fixed values shared by the phantom modules."""
from __future__ import annotations

from ..settings import DEFAULT_SUBTYPES

SUBTYPES = tuple(DEFAULT_SUBTYPES)
#: Pattern names used in ``labels["patterns"]`` (and, verbatim, in the reports).
PATTERNS = (
    "reticulation",
    "honeycombing",
    "ground-glass opacity",
    "traction bronchiectasis",
    "centrilobular nodules",
    "mosaic attenuation",
)
MANIFEST_COLUMNS = ("scan_path", "report_text", "ild", "subtype", "patient_id", "split")

_IPF, _SSC, _HP = SUBTYPES
#: The patterns each style may draw (each with its own probability; ``with_patterns`` forces them).
STYLE_PATTERNS = {
    _IPF: ("reticulation", "honeycombing", "traction bronchiectasis", "ground-glass opacity"),
    _SSC: ("ground-glass opacity", "reticulation", "traction bronchiectasis", "honeycombing"),
    _HP: ("ground-glass opacity", "mosaic attenuation", "centrilobular nodules", "reticulation",
          "traction bronchiectasis"),
}
_AIR_HU = -1000.0
#: Full-width table: carbon shells around a foam core whose density is that of aerated lung.
TABLE_SHELL_MM, TABLE_CORE_MM, TABLE_CORE_HU = 3.0, 30.0, -920.0
_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# Independent random streams per component, so that e.g. the same seed with ild=True and
# ild=False gives the same chest and differs only in the disease.
_STREAM_ANATOMY, _STREAM_DISEASE, _STREAM_REPORT, _STREAM_NOISE, _STREAM_BENIGN = 1, 2, 3, 4, 5

