"""Choosing which patches go into the montage."""
from __future__ import annotations

import numpy as np


def rank_patches(probabilities: np.ndarray, k: int, method: str = "clip", seed: int = 0) -> np.ndarray:
    """Indices of ``k`` patches: the most probable first ("clip") or a seeded random draw ("random").

    Ties are broken by candidate order so a ranking never depends on the sort algorithm.
    """
    n = int(probabilities.shape[0])
    k = min(int(k), n)
    if method == "random":
        return np.random.default_rng(seed).choice(n, size=k, replace=False)
    if method != "clip":
        raise ValueError(f"unknown retrieval method {method!r}")
    order = np.lexsort((np.arange(n), -np.asarray(probabilities, dtype=np.float64)))
    return order[:k]
