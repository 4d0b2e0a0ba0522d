"""Montage-level classification: the finding and each subtype, by the prompt softmax."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .embeddings import ImageEncoder
from .montage import montage_to_pixels
from .scoring import TextEncoder, softmax_probability


def montage_features(encoder: ImageEncoder, montage: np.ndarray) -> np.ndarray:
    """(1, D) L2-normalised features of a uint8 montage built at the model's input size."""
    return encoder.encode(montage_to_pixels(montage)).numpy()


def classify_montage(features: np.ndarray, text: TextEncoder, pairs: Sequence[tuple[str, str]]) -> list[float]:
    """P(positive) of each (positive, negative) prompt pair for one montage's features."""
    text.embed_many([t for pair in pairs for t in pair])  # one text pass for all pairs
    return [float(softmax_probability(features, *text.pair(pos, neg))[0]) for pos, neg in pairs]


def subtype_pairs(subtypes: Sequence[str]) -> list[tuple[str, str]]:
    """Paper 000 scores each subtype as "{subtype}" against "no {subtype}"."""
    return [(s, f"no {s}") for s in subtypes]
