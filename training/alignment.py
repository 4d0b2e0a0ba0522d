"""Paper 001's image-text alignment, from embeddings (numpy arrays).

- Report level: cosine similarity between each image embedding and the embedding of its own
  report; summarised as mean and standard deviation over images (paper 001 Table 4).
- Sentence level: for each image, the mean cosine similarity between the image and each
  sentence of its report embedded separately; then mean and standard deviation over images.
- Retrieval: recall@k of the matching report among all reports for each image (i2t), and of
  the matching image among all images for each report (t2i).

Embeddings need not be normalised; they are L2-normalised here.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ZeroShotILDLib.errors import InputError

from .linear_probe import l2_normalize


def _pair(image_emb, text_emb):
    x = l2_normalize(image_emb, what="image embeddings")
    t = l2_normalize(text_emb, what="text embeddings")
    if x.shape[1] != t.shape[1]:
        raise InputError(f"image ({x.shape[1]}) and text ({t.shape[1]}) embeddings differ in "
                         f"dimension")
    return x, t


def report_level_similarity(image_emb, report_emb) -> np.ndarray:
    """(n,) cosine similarity of each image with its own report (row i with row i)."""
    x, t = _pair(image_emb, report_emb)
    if x.shape[0] != t.shape[0]:
        raise InputError(f"{x.shape[0]} images but {t.shape[0]} reports; pairs must match row "
                         f"for row")
    return np.einsum("ij,ij->i", x, t)


def sentence_level_similarity(image_emb, sentence_emb, owners) -> np.ndarray:
    """(n,) mean cosine similarity of each image with the sentences of its report.

    Parameters
    ----------
    image_emb : (n, D) array
    sentence_emb : (m, D) array
        Every sentence of every report, embedded one by one.
    owners : (m,) int array
        ``owners[j]`` is the row of ``image_emb`` whose report sentence j belongs to
        (``owners_from_counts`` builds it from sentences-per-report).

    Returns
    -------
    (n,) array
        NaN for an image whose report has no sentences.
    """
    x, s = _pair(image_emb, sentence_emb)
    own = np.asarray(owners)
    if own.shape != (s.shape[0],) or (own.size and not np.issubdtype(own.dtype, np.integer)):
        raise InputError(f"owners must give one image index per sentence ({s.shape[0]})")
    if own.size and (own.min() < 0 or own.max() >= x.shape[0]):
        raise InputError(f"owners must be image indices in 0..{x.shape[0] - 1}")
    cos = np.einsum("ij,ij->i", x[own], s)
    sums = np.bincount(own, weights=cos, minlength=x.shape[0])
    counts = np.bincount(own, minlength=x.shape[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def owners_from_counts(sentences_per_report: Sequence[int]) -> np.ndarray:
    """``[2, 0, 3] -> [0, 0, 2, 2, 2]``: the owner array for sentences stored report by report."""
    counts = np.asarray(sentences_per_report, dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any():
        raise InputError("sentence counts must be non-negative, one per report")
    return np.repeat(np.arange(counts.size), counts)


def recall_at_k(image_emb, text_emb, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Retrieval recall@k in both directions for matched pairs (row i with row i).

    A tie with the true match counts against it (the rank is pessimistic), so a collapsed
    model that embeds everything alike scores 0, not 1.

    Returns
    -------
    dict
        ``{"i2t@1": ..., "t2i@1": ..., ...}`` as fractions in [0, 1].
    """
    x, t = _pair(image_emb, text_emb)
    n = x.shape[0]
    if t.shape[0] != n:
        raise InputError(f"{n} images but {t.shape[0]} texts; pairs must match row for row")
    sim = x @ t.T
    diag = np.diag(sim)
    off = ~np.eye(n, dtype=bool)
    rank_i2t = ((sim >= diag[:, None]) & off).sum(axis=1)
    rank_t2i = ((sim >= diag[None, :]) & off).sum(axis=0)
    out = {}
    for k in ks:
        if k < 1:
            raise InputError(f"recall@k needs k >= 1, got {k}")
        out[f"i2t@{k}"] = float(np.mean(rank_i2t < k))
        out[f"t2i@{k}"] = float(np.mean(rank_t2i < k))
    return out


def alignment_report(image_emb, report_emb, sentence_emb=None, owners=None,
                     ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Paper 001 Table 4 numbers plus retrieval recall.

    Returns
    -------
    dict
        ``report_mean, report_std`` (over images), ``sentence_mean, sentence_std`` (over
        images with at least one sentence; only with ``sentence_emb``), ``n_images`` and the
        ``recall_at_k`` entries.
    """
    rep = report_level_similarity(image_emb, report_emb)
    out = {"n_images": int(rep.size), "report_mean": float(rep.mean()),
           "report_std": float(rep.std())}
    if sentence_emb is not None:
        if owners is None:
            raise InputError("sentence embeddings need owners (which image each sentence is for)")
        sent = sentence_level_similarity(image_emb, sentence_emb, owners)
        valid = sent[~np.isnan(sent)]
        if valid.size == 0:
            raise InputError("no image has any sentence")
        out.update(sentence_mean=float(valid.mean()), sentence_std=float(valid.std()),
                   n_images_with_sentences=int(valid.size))
    out.update(recall_at_k(image_emb, report_emb, ks))
    return out
