"""Paper 002's transferability tests on frozen features: K-shot linear probing and base/new.

Everything works on numpy arrays (image features from any encoder, class text embeddings from
any text tower), so it is testable without models.

- ``sample_k_shot`` draws K training cases per class with a seed.
- ``fit_linear_probe`` fits a multinomial logistic regression (scikit-learn) on the
  L2-normalised features.
- ``linear_probe_eval`` repeats that over several seeds and reports mean and spread.
- ``zero_shot_probabilities`` classifies with class text prototypes (cosine, softmax).
- ``base_new_report`` splits the classes into *base* (seen in pretraining) and *new* ones and
  reports zero-shot and linear-probe results on each side, as paper 002 Table 2 does.

The headline metric is ACA, the average per-class accuracy (balanced accuracy), which paper
002 reports; accuracy and macro one-vs-rest AUROC come with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ZeroShotILDLib.errors import InputError

from . import metrics as M

DEFAULT_K = 16
DEFAULT_LOGIT_SCALE = 100.0


def _features(x, what="features") -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise InputError(f"{what} must be (cases, dimensions), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise InputError(f"{what} contain NaN or infinity")
    return a


def l2_normalize(x, *, what: str = "features") -> np.ndarray:
    """Rows scaled to unit length; zero rows are an error (they have no direction)."""
    a = _features(x, what)
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    if (norms == 0).any():
        raise InputError(f"{what}: {int((norms == 0).sum())} rows are all zeros")
    return a / norms


def _labels(y, n: int, what="labels") -> np.ndarray:
    lab = np.asarray(y)
    if lab.shape != (n,):
        raise InputError(f"{what} must be one class index per case ({n}), got shape {lab.shape}")
    if lab.size and (not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0):
        raise InputError(f"{what} must be non-negative class indices")
    return lab.astype(np.int64)


def sample_k_shot(labels, k: int = DEFAULT_K, *, seed: int = 0,
                  classes: Optional[Sequence[int]] = None) -> np.ndarray:
    """Indices of ``k`` cases per class, drawn without replacement.

    Parameters
    ----------
    labels : (n,) int array
        Class index of each case.
    k : int, default 16
        Shots per class (paper 002 reports K = 16).
    seed : int, default 0
    classes : sequence of int, optional
        Classes to draw from (default: every class present).

    Returns
    -------
    (k * n_classes,) int array, sorted.

    Raises
    ------
    InputError
        If a class has fewer than ``k`` cases.
    """
    lab = np.asarray(labels)
    if k < 1:
        raise InputError(f"K must be at least 1, got {k}")
    classes = sorted(set(lab.tolist())) if classes is None else list(classes)
    rng = np.random.default_rng(seed)
    picked = []
    for c in classes:
        idx = np.flatnonzero(lab == c)
        if idx.size < k:
            raise InputError(f"class {c} has {idx.size} training cases; {k}-shot needs {k}")
        picked.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


@dataclass
class LinearProbe:
    """A fitted probe; ``classes[j]`` is the class index of probability column j."""

    model: object
    classes: np.ndarray
    n_classes: int

    def predict_proba(self, features) -> np.ndarray:
        """(n, n_classes) probabilities over *all* classes (zero for classes not trained on)."""
        x = l2_normalize(features)
        p = self.model.predict_proba(x)
        out = np.zeros((x.shape[0], self.n_classes))
        out[:, self.classes] = p
        return out


def fit_linear_probe(features, labels, *, c: float = 1.0, max_iter: int = 2000,
                     n_classes: Optional[int] = None, seed: int = 0) -> LinearProbe:
    """Multinomial logistic regression on L2-normalised frozen features.

    Parameters
    ----------
    features : (n, D) array
    labels : (n,) int array
    c : float, default 1.0
        Inverse L2 regularisation strength (scikit-learn's ``C``).
    max_iter : int, default 2000
    n_classes : int, optional
        Total number of classes (columns of ``predict_proba``); default ``max(labels) + 1``.
    seed : int, default 0
    """
    from sklearn.linear_model import LogisticRegression

    x = l2_normalize(features)
    y = _labels(labels, x.shape[0])
    present = np.unique(y)
    if present.size < 2:
        raise InputError("a linear probe needs training cases of at least 2 classes")
    model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    model.fit(x, y)
    return LinearProbe(model=model, classes=np.asarray(model.classes_),
                       n_classes=int(n_classes if n_classes is not None else y.max() + 1))


def classification_metrics(labels, probabilities, *, classes: Optional[Sequence[int]] = None
                           ) -> dict:
    """ACA (balanced accuracy), accuracy and macro one-vs-rest AUROC.

    Parameters
    ----------
    labels : (n,) int array
    probabilities : (n, C) array
    classes : sequence of int, optional
        Decide only among these columns (the base or the new classes); default every column.
        Every case must belong to one of them.
    """
    p = _features(probabilities, "probabilities")
    y = _labels(labels, p.shape[0])
    cols = np.arange(p.shape[1]) if classes is None else np.array(sorted(set(classes)))
    if cols.size == 0 or cols[0] < 0 or cols[-1] >= p.shape[1]:
        raise InputError(f"classes must be column indices in 0..{p.shape[1] - 1}")
    if not np.isin(y, cols).all():
        raise InputError("some cases belong to a class outside the evaluated classes")
    sub = p[:, cols]
    pred = cols[np.argmax(sub, axis=1)]
    per_class = [float(np.mean(pred[y == c] == c)) for c in cols if (y == c).any()]
    out = {"aca": float(np.mean(per_class)), "accuracy": float(np.mean(pred == y)),
           "n": int(y.size), "n_classes": int(len(cols))}
    local = np.searchsorted(cols, y)
    if len(cols) == 2:
        yy = (local == 1).astype(int)
        out["auroc"] = M.roc_auc(yy, sub[:, 1]) if 0 < yy.sum() < yy.size else float("nan")
    else:
        try:
            out["auroc"] = M.macro_auroc(local, sub).value
        except InputError:
            out["auroc"] = float("nan")
    return out


def linear_probe_eval(train_features, train_labels, test_features, test_labels, *,
                      k: int = DEFAULT_K, seeds: Sequence[int] = (0, 1, 2, 3, 4),
                      classes: Optional[Sequence[int]] = None, c: float = 1.0) -> dict:
    """K-shot linear probing repeated over seeds (a new K-shot draw per seed).

    Parameters
    ----------
    train_features, test_features : (n, D) arrays
    train_labels, test_labels : (n,) int arrays
    k : int, default 16
    seeds : sequence of int, default (0, 1, 2, 3, 4)
    classes : sequence of int, optional
        Probe only these classes (train and test cases of other classes are ignored).
    c : float, default 1.0

    Returns
    -------
    dict
        ``{"runs": [per-seed metrics], "aca_mean", "aca_std", "accuracy_mean",
        "auroc_mean", "k", "seeds"}``.
    """
    xtr = _features(train_features, "train features")
    xte = _features(test_features, "test features")
    ytr = _labels(train_labels, xtr.shape[0], "train labels")
    yte = _labels(test_labels, xte.shape[0], "test labels")
    cls = sorted(set(ytr.tolist())) if classes is None else sorted(classes)
    n_classes = int(max(max(cls), yte.max() if yte.size else 0) + 1)
    keep_te = np.isin(yte, cls)
    if not keep_te.any():
        raise InputError("no test cases of the probed classes")
    runs = []
    for seed in seeds:
        idx = sample_k_shot(ytr, k, seed=seed, classes=cls)
        probe = fit_linear_probe(xtr[idx], ytr[idx], c=c, n_classes=n_classes, seed=seed)
        p = probe.predict_proba(xte[keep_te])
        runs.append({"seed": seed, **classification_metrics(yte[keep_te], p, classes=cls)})
    out = {"runs": runs, "k": k, "seeds": list(seeds)}
    for m in ("aca", "accuracy", "auroc"):
        vals = np.array([r[m] for r in runs])
        out[f"{m}_mean"] = float(np.mean(vals))
        out[f"{m}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return out


def zero_shot_probabilities(features, class_embeddings, *,
                            logit_scale: float = DEFAULT_LOGIT_SCALE,
                            classes: Optional[Sequence[int]] = None) -> np.ndarray:
    """Softmax over ``logit_scale * cosine(image, class prototype)``.

    Parameters
    ----------
    features : (n, D) array
        Image features.
    class_embeddings : (C, D) array
        One text (or learned) prototype per class, e.g. the mean of a class's prompt
        embeddings.
    logit_scale : float, default 100
        CLIP's trained temperature (``exp(log 100)``); the ranking inside a row does not
        depend on it, the AUROC across rows may.
    classes : sequence of int, optional
        Compete only among these classes; other columns are 0.

    Returns
    -------
    (n, C) array
    """
    x = l2_normalize(features)
    t = l2_normalize(class_embeddings, what="class embeddings")
    if t.shape[1] != x.shape[1]:
        raise InputError(f"image features ({x.shape[1]}) and class embeddings ({t.shape[1]}) "
                         f"differ in dimension")
    cols = np.arange(t.shape[0]) if classes is None else np.asarray(list(classes))
    logits = logit_scale * (x @ t[cols].T)
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    out = np.zeros((x.shape[0], t.shape[0]))
    out[:, cols] = e / e.sum(axis=1, keepdims=True)
    return out


def _hmean(a: float, b: float) -> float:
    return float(2 * a * b / (a + b)) if a + b > 0 else 0.0


def base_new_report(train_features, train_labels, test_features, test_labels,
                    class_embeddings, *, base_classes: Sequence[int],
                    class_names: Optional[Sequence[str]] = None, k: int = DEFAULT_K,
                    seeds: Sequence[int] = (0, 1, 2, 3, 4),
                    logit_scale: float = DEFAULT_LOGIT_SCALE, c: float = 1.0) -> dict:
    """Base/new disentanglement report (paper 002 Table 2).

    Classes are split into *base* (``base_classes``: known to the pretraining, e.g. labelled
    during DAPT) and *new* (the rest). Each side is evaluated only on its own test cases and
    its classes compete only among themselves:

    - zero-shot with the class prototypes ``class_embeddings`` on base and on new;
    - K-shot linear probe trained on base and evaluated on base, and likewise on new.

    Parameters
    ----------
    train_features, test_features : (n, D) arrays
        Frozen image features.
    train_labels, test_labels : (n,) int arrays
        Class indices into ``class_embeddings``.
    class_embeddings : (C, D) array
    base_classes : sequence of int
        At least one; every other class is new (at least 2 new classes are needed for a
        zero-shot decision among them).
    class_names : sequence of str, optional
    k, seeds, c
        As ``linear_probe_eval``.
    logit_scale : float, default 100

    Returns
    -------
    dict
        ``{"base": {"classes", "zero_shot", "linear_probe"}, "new": {...},
        "zero_shot_avg", "linear_probe_avg", "zero_shot_hmean", "linear_probe_hmean"}``.
        ``*_avg`` is paper 002's "Avg." column: the arithmetic mean of the base and new ACA.
        ``*_hmean`` (the harmonic mean of CoOp-style base-to-new papers) is kept as an extra.
    """
    emb = _features(class_embeddings, "class embeddings")
    n_classes = emb.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
    if len(names) != n_classes:
        raise InputError(f"{len(names)} class names for {n_classes} class embeddings")
    base = sorted(set(int(b) for b in base_classes))
    if not base or base[0] < 0 or base[-1] >= n_classes:
        raise InputError(f"base classes must be indices in 0..{n_classes - 1}")
    new = [i for i in range(n_classes) if i not in base]
    if len(new) < 2 or len(base) < 2:
        raise InputError(f"base/new needs at least 2 classes on each side "
                         f"(got {len(base)} base, {len(new)} new)")
    xte = _features(test_features, "test features")
    yte = _labels(test_labels, xte.shape[0], "test labels")
    if yte.size and yte.max() >= n_classes:
        raise InputError("a test label has no class embedding")
    out: dict = {}
    for side, cls in (("base", base), ("new", new)):
        keep = np.isin(yte, cls)
        if not keep.any():
            raise InputError(f"no test cases of the {side} classes")
        zs = zero_shot_probabilities(xte[keep], emb, logit_scale=logit_scale, classes=cls)
        out[side] = {
            "classes": [names[i] for i in cls],
            "zero_shot": classification_metrics(yte[keep], zs, classes=cls),
            "linear_probe": linear_probe_eval(train_features, train_labels, xte, yte, k=k,
                                              seeds=seeds, classes=cls, c=c),
        }
    for method, key in (("zero_shot", "aca"), ("linear_probe", "aca_mean")):
        out[f"{method}_avg"] = float((out["base"][method][key] + out["new"][method][key]) / 2)
    out["zero_shot_hmean"] = _hmean(out["base"]["zero_shot"]["aca"], out["new"]["zero_shot"]["aca"])
    out["linear_probe_hmean"] = _hmean(out["base"]["linear_probe"]["aca_mean"],
                                       out["new"]["linear_probe"]["aca_mean"])
    return out
