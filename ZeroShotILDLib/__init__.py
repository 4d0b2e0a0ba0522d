"""ZeroShotILDLib: zero-shot ILD classification of chest HRCT with CLIP-style models.

Pure Python on numpy, SimpleITK, scikit-image, torch and open_clip; no Slicer import, so the
Slicer module, the command line and the training package all share this one pipeline:

volume -> lung mask -> candidate patches -> patch embeddings -> prompt probabilities
-> ranking -> montage -> finding/subtype probabilities -> outputs
"""

__version__ = "0.1.0"
