"""Synthetic chest HRCT phantoms in Hounsfield units.

The fixture for tests, the demo, benchmarks and DAPT training: a seeded generator of chest CT
volumes that a lung segmentation and a CLIP model take for chest CT, with ground truth (lungs,
airways, disease) and a synthetic radiology report consistent with what was drawn.

Anatomy is laid out in millimetres, so any shape and spacing gives the same chest (scaled down only
when the field of view is too small to hold it). Coordinates follow SimpleITK with an identity
direction: arrays are ``[z, y, x]``, LPS ``+x`` is the patient's left, ``+y`` posterior and ``+z``
superior (slice 0 is the most caudal).

The volume is built in passes, each cheap in memory (float32 volume, per-slice 2-D work):

1. per slice: body, subcutaneous fat, muscle, table, spine, sternum, scapulae, mediastinum and
   heart, liver below the diaphragm domes, and the two lungs (truth ``lung_mask``);
2. tubes: ribs, clavicles, trachea and main bronchi, bronchial trees, arteries and veins;
3. per slice: diffuse disease (reticulation, ground glass, mosaic attenuation) from smooth
   3-D fields;
4. tubes and spheres: honeycomb cysts, traction bronchiectasis, centrilobular nodules;
5. per slice: scanner blur, correlated noise, circular field of view, int16, and the generator's
   signature (``ZeroShotILDLib.phantom_signature``), so a phantom is known by its voxels.

Disease covers the share of the lung the caller asks for (``involvement``, 0-1) in the
distribution of its style, or 12-30 % by default; ``Phantom.pattern_masks`` holds the region of
each pattern drawn.

Modules, one job each: ``generate`` (the public entry), ``builder`` (the passes in order),
``anatomy``, ``trees``, ``raster`` (tubes and spheres into the volume), ``disease``, ``report``,
``cohort``, ``volume`` (the ``Phantom`` record), ``fields`` (grid and smooth fields),
``checks`` and ``constants``.
"""
from __future__ import annotations

from .cohort import generate_cohort, write_cohort
from .constants import MANIFEST_COLUMNS, PATTERNS, STYLE_PATTERNS, SUBTYPES, TABLE_CORE_HU, TABLE_CORE_MM, TABLE_SHELL_MM
from .generate import add_full_width_table, generate_phantom
from .volume import Phantom

__all__ = [
    "MANIFEST_COLUMNS", "PATTERNS", "STYLE_PATTERNS", "SUBTYPES", "TABLE_CORE_HU", "TABLE_CORE_MM", "TABLE_SHELL_MM",
    "Phantom", "add_full_width_table", "generate_cohort", "generate_phantom", "write_cohort",
]
