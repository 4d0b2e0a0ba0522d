"""Classification metrics with bootstrap confidence intervals (papers 000, 001, CheXzero).

All functions take numpy-compatible arrays: ``y_true`` holds 0/1 labels, ``y_score`` holds
probabilities or any scores where higher means "more likely positive". The definitions match
scikit-learn (``roc_auc_score``, ``average_precision_score``, ``f1_score``,
``matthews_corrcoef``) to floating-point precision; they are re-implemented in numpy so that
1,000 bootstrap resamples stay fast and no optional dependency is needed at evaluation time.

Conventions
-----------
- A threshold ``t`` predicts positive when ``score >= t``.
- F1 and MCC need a threshold. Zero-shot probabilities sit near 0.5 (CheXzero's softmax of two
  cosines), so a fixed 0.5 is meaningless: the threshold is the one with maximal F1 on a
  *validation* set, then applied unchanged to the test set and reported with the results.
- AUROC and AUPRC are undefined when only one class is present: the scalar functions raise
  ``InputError``; ``macro_auroc`` skips such classes (NaN per class) and says which.
- Bootstrap: resample cases with replacement; a resample holding a single class is discarded
  and redrawn (it has no AUROC), and the number of redraws is reported. CIs are percentiles.
  With ``groups`` (patient ids) the resampled unit is the patient (cluster bootstrap): all
  images of a drawn patient enter together, so images of one patient, which are not
  independent, do not narrow the interval. Each resample draws as many patients as there are,
  with replacement, from ``rng.integers(0, n_patients, n_patients)`` over the patients in order
  of first appearance; with one image per patient it is exactly the image bootstrap.
- Two models on the same cases: :func:`paired_comparison` resamples once for both (paired
  bootstrap, patient-level with ``groups``) and reports the AUROC difference, its CI and a
  two-sided bootstrap p-value.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from ZeroShotILDLib.errors import InputError

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95


# ---------------------------------------------------------------------------------------------
# Input checks

def _binary(y_true, y_score=None, *, what: str = "labels"):
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise InputError(f"{what} must be one value per case, got shape {y.shape}")
    if y.dtype == bool:
        y = y.astype(np.int64)
    if y.size and not np.isin(y, (0, 1)).all():
        bad = y[~np.isin(y, (0, 1))][0]
        raise InputError(f"{what} must be 0 or 1, found {bad!r}")
    y = y.astype(np.int64)
    if y_score is None:
        return y
    s = np.asarray(y_score, dtype=np.float64)
    if s.shape != y.shape:
        raise InputError(f"scores and labels differ in length ({s.shape[0] if s.ndim else s.shape} "
                         f"vs {y.shape[0]})")
    if not np.isfinite(s).all():
        raise InputError(f"scores contain NaN or infinity ({int((~np.isfinite(s)).sum())} cases)")
    return y, s


def _require_both_classes(y: np.ndarray, metric: str) -> None:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        only = "negatives" if n_pos == 0 else "positives"
        raise InputError(f"{metric} needs both positive and negative cases; got only {only} "
                         f"(n={y.size})")


# ---------------------------------------------------------------------------------------------
# Curves and threshold-free metrics

def _clf_curve(y: np.ndarray, s: np.ndarray):
    """Cumulative (fp, tp) at each distinct score, highest score first, and those scores."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    y_sorted = y[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(s_sorted)), y.size - 1]
    tps = np.cumsum(y_sorted)[last_of_group].astype(np.float64)
    fps = (last_of_group + 1) - tps
    return fps, tps, s_sorted[last_of_group]


def roc_auc(y_true, y_score) -> float:
    """Area under the ROC curve (ties count one half: the Mann-Whitney statistic)."""
    y, s = _binary(y_true, y_score)
    _require_both_classes(y, "AUROC")
    return _auroc_unchecked(y, s)


def _auroc_unchecked(y: np.ndarray, s: np.ndarray) -> float:
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # Mid-ranks of tied groups, 1-based.
    midranks = np.cumsum(counts) - (counts - 1) / 2.0
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    rank_sum = float(midranks[inverse][y == 1].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def roc_curve(y_true, y_score):
    """ROC points ``(fpr, tpr, thresholds)``, starting at (0, 0) with threshold +inf."""
    y, s = _binary(y_true, y_score)
    _require_both_classes(y, "ROC curve")
    fps, tps, thr = _clf_curve(y, s)
    fpr = np.r_[0.0, fps / fps[-1]]
    tpr = np.r_[0.0, tps / tps[-1]]
    return fpr, tpr, np.r_[np.inf, thr]


def average_precision(y_true, y_score) -> float:
    """AUPRC as average precision: ``sum_n (R_n - R_{n-1}) P_n`` over distinct thresholds."""
    y, s = _binary(y_true, y_score)
    _require_both_classes(y, "AUPRC")
    return _ap_unchecked(y, s)


def _ap_unchecked(y: np.ndarray, s: np.ndarray) -> float:
    fps, tps, _ = _clf_curve(y, s)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def pr_curve(y_true, y_score):
    """Precision-recall points ``(precision, recall, thresholds)`` by decreasing threshold,
    ending at (1, 0) as scikit-learn does (reversed order)."""
    y, s = _binary(y_true, y_score)
    _require_both_classes(y, "PR curve")
    fps, tps, thr = _clf_curve(y, s)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thr[::-1]


# ---------------------------------------------------------------------------------------------
# Thresholded metrics

def _confusion(y: np.ndarray, s: np.ndarray, threshold: float):
    pred = s >= threshold
    tp = float(np.sum(pred & (y == 1)))
    fp = float(np.sum(pred & (y == 0)))
    fn = float(np.sum(~pred & (y == 1)))
    tn = float(y.size - tp - fp - fn)
    return tp, fp, fn, tn


def _f1(tp, fp, fn) -> float:
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


def _mcc(tp, fp, fn, tn) -> float:
    denom = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return 0.0 if denom == 0 else (tp * tn - fp * fn) / np.sqrt(denom)


def f1_at(y_true, y_score, threshold: float) -> float:
    """F1 of ``score >= threshold``; 0 when there are no true or predicted positives."""
    y, s = _binary(y_true, y_score)
    return _f1(*_confusion(y, s, threshold)[:3])


def mcc_at(y_true, y_score, threshold: float) -> float:
    """Matthews correlation of ``score >= threshold``; 0 when a margin is empty (as sklearn)."""
    y, s = _binary(y_true, y_score)
    return float(_mcc(*_confusion(y, s, threshold)))


def max_f1_threshold(y_true, y_score) -> tuple[float, float]:
    """The threshold with the highest F1 and that F1.

    Candidates are the distinct scores; among equal F1 values the highest threshold wins
    (fewest positive calls).

    Returns
    -------
    (threshold, f1) : tuple of float
    """
    y, s = _binary(y_true, y_score)
    if y.sum() == 0:
        raise InputError("cannot choose an F1 threshold: the validation set has no positives")
    fps, tps, thr = _clf_curve(y, s)
    f1 = 2 * tps / (tps + fps + y.sum())
    best = int(np.argmax(f1))  # first maximum = highest threshold
    return float(thr[best]), float(f1[best])


# ---------------------------------------------------------------------------------------------
# Bootstrap

@dataclass(frozen=True)
class Estimate:
    """A metric on the full set with its bootstrap percentile interval."""

    value: float
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    confidence: float = DEFAULT_CONFIDENCE
    #: Usable resamples behind the interval (0 = no interval computed).
    n_resamples: int = 0
    #: Resamples discarded and redrawn because they held a single class.
    n_redrawn: int = 0
    #: What was resampled: "images" (each case) or "patients" (cluster bootstrap over ``groups``).
    unit: str = "images"

    def __str__(self) -> str:
        if self.n_resamples:
            return f"{self.value:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}]"
        return f"{self.value:.3f}"


def _clusters(groups, n: int) -> Optional[list]:
    """Indices of each group's cases, groups in order of first appearance; None without groups."""
    if groups is None:
        return None
    keys = list(groups)
    if len(keys) != n:
        raise InputError(f"patient ids and labels differ in length ({len(keys)} vs {n})")
    members: dict = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    return [np.asarray(v, dtype=np.int64) for v in members.values()]


def resample_indices(rng: np.random.Generator, n: int, clusters: Optional[list]) -> np.ndarray:
    """One bootstrap resample of ``n`` cases: cases, or whole clusters (patients), with replacement."""
    if clusters is None:
        return rng.integers(0, n, n)
    drawn = rng.integers(0, len(clusters), len(clusters))
    return np.concatenate([clusters[c] for c in drawn])


def bootstrap(metrics: Mapping[str, Callable[[np.ndarray, np.ndarray], float]], y_true, y_score,
              *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
              confidence: float = DEFAULT_CONFIDENCE, max_draws: Optional[int] = None,
              groups: Optional[Sequence] = None) -> dict[str, Estimate]:
    """Several metrics on the full data and on the same bootstrap resamples.

    Parameters
    ----------
    metrics : mapping
        Name -> ``f(y, s)`` on numpy arrays (both classes guaranteed present).
    y_true : (n,) 0/1 array
    y_score : (n,) or (n, k) array
        Rows are resampled together with ``y_true``.
    n_resamples : int, default 1000
        Usable resamples wanted; 0 computes the values only.
    seed : int, default 0
    confidence : float, default 0.95
    max_draws : int, optional
        Give up after this many draws (default ``100 * n_resamples``): with very few cases of
        one class almost every resample is single-class.
    groups : (n,) sequence, optional
        Patient id of each case: resample patients (cluster bootstrap), not cases.

    Returns
    -------
    dict
        Name -> ``Estimate`` (value on the full data, percentile CI, usable/redrawn counts).
    """
    y = _binary(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if s.shape[0] != y.shape[0]:
        raise InputError(f"scores and labels differ in length ({s.shape[0]} vs {y.shape[0]})")
    _require_both_classes(y, "bootstrap")
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be between 0 and 1, got {confidence}")
    values = {name: float(f(y, s)) for name, f in metrics.items()}
    clusters = _clusters(groups, y.size)
    unit = "images" if clusters is None else "patients"
    if n_resamples <= 0:
        return {name: Estimate(v, confidence=confidence, unit=unit) for name, v in values.items()}
    max_draws = max_draws or 100 * n_resamples
    rng = np.random.default_rng(seed)
    samples = {name: np.empty(n_resamples) for name in metrics}
    n = y.size
    done = redrawn = 0
    while done < n_resamples:
        if done + redrawn >= max_draws:
            raise InputError(f"bootstrap: {redrawn} of {done + redrawn} resamples held a single "
                             f"class; too few cases of one class for confidence intervals")
        idx = resample_indices(rng, n, clusters)
        yb = y[idx]
        k = int(yb.sum())
        if k == 0 or k == yb.size:
            redrawn += 1
            continue
        sb = s[idx]
        for name, f in metrics.items():
            samples[name][done] = f(yb, sb)
        done += 1
    alpha = (1.0 - confidence) / 2.0
    out = {}
    for name, v in values.items():
        lo, hi = np.quantile(samples[name], [alpha, 1.0 - alpha])
        out[name] = Estimate(v, float(lo), float(hi), confidence, done, redrawn, unit)
    return out


@dataclass(frozen=True)
class PairedComparison:
    """AUROC of two models on the same cases and their difference (a - b), paired bootstrap."""

    model_a: str
    model_b: str
    auroc_a: float
    auroc_b: float
    difference: Estimate
    #: Two-sided bootstrap p-value of "no difference": twice the share of resampled differences
    #: on the far side of 0 (at least 1 / n_resamples).
    p_value: float
    n: int
    n_patients: Optional[int] = None

    def to_dict(self) -> dict:
        d = self.difference
        return {"model_a": self.model_a, "model_b": self.model_b, "auroc_a": self.auroc_a, "auroc_b": self.auroc_b,
                "difference": d.value, "difference_low": d.ci_low, "difference_high": d.ci_high,
                "p_value": self.p_value, "n": self.n, "n_patients": self.n_patients, "unit": d.unit,
                "n_resamples": d.n_resamples, "confidence": d.confidence}


def paired_comparison(y_true, s_a, s_b, *, names: tuple = ("a", "b"), groups: Optional[Sequence] = None,
                      n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                      confidence: float = DEFAULT_CONFIDENCE) -> PairedComparison:
    """Paired bootstrap comparison of two models' AUROC on the same cases.

    Both models are scored on the same resamples (patients with ``groups``), so the interval of
    the difference accounts for the cases they share; separate CIs that overlap say nothing
    about a paired difference.
    """
    y, a = _binary(y_true, s_a)
    _, b = _binary(y_true, s_b)
    both = np.stack([a, b], axis=1)
    est = bootstrap({"difference": lambda yy, ss: _auroc_unchecked(yy, ss[:, 0]) - _auroc_unchecked(yy, ss[:, 1])},
                    y, both, n_resamples=n_resamples, seed=seed, confidence=confidence, groups=groups)["difference"]
    p_value = float("nan")
    if n_resamples > 0:
        # The resampled differences again (same seed, same draws) for the p-value.
        rng, clusters = np.random.default_rng(seed), _clusters(groups, y.size)
        diffs = []
        while len(diffs) < est.n_resamples:
            idx = resample_indices(rng, y.size, clusters)
            yb = y[idx]
            if 0 < int(yb.sum()) < yb.size:
                diffs.append(_auroc_unchecked(yb, a[idx]) - _auroc_unchecked(yb, b[idx]))
        diffs = np.asarray(diffs)
        tail = min(float(np.mean(diffs <= 0)), float(np.mean(diffs >= 0)))
        p_value = min(1.0, max(2.0 * tail, 1.0 / diffs.size))
    return PairedComparison(model_a=names[0], model_b=names[1], auroc_a=_auroc_unchecked(y, a),
                            auroc_b=_auroc_unchecked(y, b), difference=est, p_value=p_value, n=int(y.size),
                            n_patients=None if groups is None else len(set(groups)))


#: A test set with fewer cases than this in either class gives AUROC intervals too wide to compare models.
SMALL_CLASS = 20
#: ... and an AUROC interval at least this wide is flagged as well.
WIDE_CI = 0.2


def small_test_set_note(y_true, auroc: Optional[Estimate] = None, *, n_patients: Optional[int] = None) -> str:
    """"" or one line saying the test set is too small for its confidence interval to be useful."""
    y = _binary(y_true)
    pos, neg = int(y.sum()), int(y.size - y.sum())
    wide = auroc is not None and auroc.n_resamples and (auroc.ci_high - auroc.ci_low) >= WIDE_CI
    if min(pos, neg) >= SMALL_CLASS and not wide:
        return ""
    who = f" from {n_patients} patients" if n_patients is not None else ""
    width = f"; the AUROC interval is {auroc.ci_high - auroc.ci_low:.2f} wide" if wide else ""
    return (f"small test set: {pos} positive and {neg} negative scans{who}{width}: differences between models "
            f"of this size are not measurable here")


def bootstrap_ci(metric: Callable, y_true, y_score, **kwargs) -> Estimate:
    """``bootstrap`` for one metric, e.g. ``bootstrap_ci(roc_auc, y, s, seed=1)``."""
    return bootstrap({"m": metric}, y_true, y_score, **kwargs)["m"]


# ---------------------------------------------------------------------------------------------
# Reports

@dataclass(frozen=True)
class BinaryReport:
    """AUROC, AUPRC, F1 and MCC on a test set, F1/MCC at a threshold chosen on validation."""

    auroc: Estimate
    auprc: Estimate
    f1: Estimate
    mcc: Estimate
    threshold: float
    #: "validation" (or the name of the split the threshold came from), or ``OPTIMISTIC`` when
    #: no other set was given: the threshold was then chosen on the evaluated scans themselves.
    threshold_source: str
    n: int
    n_positive: int
    #: Patients behind the ``n`` scans when patient ids were given (the bootstrap then resamples patients).
    n_patients: Optional[int] = None
    #: "" or what is wrong with the threshold on the evaluated scans: it calls every scan positive
    #: (F1 = 2p/(1+p), MCC 0) or every scan negative; AUROC/AUPRC still rank, F1 means nothing.
    degenerate: str = ""

    def to_dict(self) -> dict:
        """Flat dict for CSV/JSON: ``auroc, auroc_low, auroc_high, ...``."""
        out: dict = {}
        for name in ("auroc", "auprc", "f1", "mcc"):
            e: Estimate = getattr(self, name)
            out[name] = e.value
            out[f"{name}_low"] = e.ci_low
            out[f"{name}_high"] = e.ci_high
        out.update(threshold=self.threshold, threshold_source=self.threshold_source, degenerate=self.degenerate,
                   n=self.n, n_positive=self.n_positive, n_patients=self.n_patients,
                   bootstrap_unit=self.auroc.unit, n_resamples=self.auroc.n_resamples,
                   n_redrawn=self.auroc.n_redrawn, confidence=self.auroc.confidence)
        return out


#: ``threshold_source`` when the F1 threshold was chosen on the very scans it is scored on.
OPTIMISTIC = "optimistic: chosen on the evaluated set"


def degenerate_threshold(y_true, y_score, threshold: float) -> str:
    """"" or a one-phrase flag when ``score >= threshold`` gives every case the same call."""
    y, s = _binary(y_true, y_score)
    positives = int(np.sum(s >= threshold))
    if positives == y.size:
        return "the threshold calls every scan positive"
    if positives == 0:
        return "the threshold calls every scan negative"
    return ""


def evaluate_binary(y_test, s_test, *, y_val=None, s_val=None,
                    n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                    confidence: float = DEFAULT_CONFIDENCE, val_name: str = "validation",
                    groups: Optional[Sequence] = None) -> BinaryReport:
    """Paper 000's evaluation: AUROC, AUPRC and F1 (plus MCC) with bootstrap 95 % CIs.

    Parameters
    ----------
    y_test, s_test : (n,) arrays
        Test labels (0/1) and scores.
    y_val, s_val : (m,) arrays, optional
        Validation labels and scores; the max-F1 threshold is chosen here. Without them it is
        chosen on the test set itself and ``threshold_source`` says so (``OPTIMISTIC``).
    n_resamples : int, default 1000
    seed : int, default 0
    confidence : float, default 0.95
    val_name : str, default "validation"
        How ``threshold_source`` names the set the threshold came from.
    groups : (n,) sequence, optional
        Patient id of each test case: the bootstrap resamples patients (cluster bootstrap).

    Returns
    -------
    BinaryReport
        ``degenerate`` flags a threshold that calls every test case the same. The F1/MCC intervals keep the threshold fixed (the threshold is not re-chosen per
        resample: it belongs to the model, not to the test set).
    """
    y, s = _binary(y_test, s_test)
    if (y_val is None) != (s_val is None):
        raise InputError("give both validation labels and validation scores, or neither")
    if y_val is not None:
        threshold, _ = max_f1_threshold(y_val, s_val)
        source = val_name
    else:
        threshold, _ = max_f1_threshold(y, s)
        source = OPTIMISTIC
    est = bootstrap(
        {
            "auroc": _auroc_unchecked,
            "auprc": _ap_unchecked,
            "f1": lambda yy, ss: _f1(*_confusion(yy, ss, threshold)[:3]),
            "mcc": lambda yy, ss: float(_mcc(*_confusion(yy, ss, threshold))),
        },
        y, s, n_resamples=n_resamples, seed=seed, confidence=confidence, groups=groups,
    )
    return BinaryReport(auroc=est["auroc"], auprc=est["auprc"], f1=est["f1"], mcc=est["mcc"],
                        threshold=threshold, threshold_source=source, n=int(y.size),
                        n_positive=int(y.sum()), n_patients=None if groups is None else len(set(groups)),
                        degenerate=degenerate_threshold(y, s, threshold))


def ensemble_probabilities(probabilities: Sequence) -> np.ndarray:
    """Average probabilities over models (CheXzero's and paper 000's top-5 ensembles)."""
    arrays = [np.asarray(p, dtype=np.float64) for p in probabilities]
    if not arrays:
        raise InputError("an ensemble needs at least one model's probabilities")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise InputError(f"ensemble members disagree in shape: {sorted(shapes)}")
    return np.mean(arrays, axis=0)


def evaluate_models(scores: Mapping[str, tuple], y_test, *, y_val=None, ensemble: bool = True,
                    **kwargs) -> dict[str, BinaryReport]:
    """``evaluate_binary`` for several models and, optionally, their average.

    Parameters
    ----------
    scores : mapping
        Model name -> ``(s_val, s_test)``; ``s_val`` may be None when ``y_val`` is None.
    y_test, y_val : arrays
    ensemble : bool, default True
        Add an entry ``"ensemble"`` that averages all models' probabilities.
    **kwargs
        Passed to ``evaluate_binary`` (``n_resamples``, ``seed``, ``confidence``).
    """
    out = {}
    for name, (s_val, s_test) in scores.items():
        out[name] = evaluate_binary(y_test, s_test, y_val=y_val,
                                    s_val=s_val if y_val is not None else None, **kwargs)
    if ensemble and len(scores) > 1:
        s_val = (ensemble_probabilities([v for v, _ in scores.values()])
                 if y_val is not None else None)
        s_test = ensemble_probabilities([t for _, t in scores.values()])
        out["ensemble"] = evaluate_binary(y_test, s_test, y_val=y_val, s_val=s_val, **kwargs)
    return out


# ---------------------------------------------------------------------------------------------
# Several classes

def one_hot(labels, n_classes: int) -> np.ndarray:
    """(n,) integer class indices -> (n, n_classes) 0/1 matrix."""
    lab = np.asarray(labels)
    if lab.ndim != 1 or (lab.size and (lab.min() < 0 or lab.max() >= n_classes)):
        raise InputError(f"class indices must be 0..{n_classes - 1}")
    out = np.zeros((lab.size, n_classes), dtype=np.int64)
    out[np.arange(lab.size), lab.astype(np.int64)] = 1
    return out


@dataclass(frozen=True)
class MacroResult:
    """Mean over classes of a per-class metric, with the classes that had to be skipped."""

    value: float
    per_class: dict = field(default_factory=dict)
    #: Classes with a single label value (metric undefined, NaN in ``per_class``).
    skipped: tuple = ()


def _class_names(n: int, class_names) -> list[str]:
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    if len(names) != n:
        raise InputError(f"{len(names)} class names for {n} score columns")
    return names


def macro_auroc(y_true, y_score, *, class_names: Optional[Sequence[str]] = None) -> MacroResult:
    """Mean one-vs-rest AUROC over classes (paper 001's macro AUC).

    Parameters
    ----------
    y_true : (n, C) 0/1 array, or (n,) class indices (one label per case)
    y_score : (n, C) array
    class_names : sequence of str, optional

    Returns
    -------
    MacroResult
        Classes whose column holds a single value are skipped (NaN, listed in ``skipped``);
        ``InputError`` if every class is skipped.
    """
    s = np.asarray(y_score, dtype=np.float64)
    if s.ndim != 2:
        raise InputError(f"scores must be (cases, classes), got shape {s.shape}")
    y = np.asarray(y_true)
    if y.ndim == 1:
        y = one_hot(y, s.shape[1])
    if y.shape != s.shape:
        raise InputError(f"labels {y.shape} and scores {s.shape} differ in shape")
    names = _class_names(s.shape[1], class_names)
    per, skipped = {}, []
    for j, name in enumerate(names):
        col = _binary(y[:, j], what=f"labels of class {name!r}")
        if col.sum() in (0, col.size):
            per[name] = float("nan")
            skipped.append(name)
        else:
            per[name] = roc_auc(col, s[:, j])
    valid = [v for v in per.values() if v == v]
    if not valid:
        raise InputError("macro AUROC: every class has a single label value; nothing to rank")
    return MacroResult(float(np.mean(valid)), per, tuple(skipped))


def evaluate_multilabel(y_test, s_test, *, y_val=None, s_val=None,
                        class_names: Optional[Sequence[str]] = None,
                        n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                        confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """Per-class ``BinaryReport`` and their means (paper 001 Table 3: mean AUC, F1, MCC).

    Each class gets its own max-F1 threshold from the validation set. Classes with a single
    label value in the test (or validation) set are skipped and listed.

    Returns
    -------
    dict
        ``{"per_class": {name: BinaryReport}, "mean_auroc", "mean_auprc", "mean_f1",
        "mean_mcc", "skipped": [...]}``
    """
    s = np.asarray(s_test, dtype=np.float64)
    y = np.asarray(y_test)
    if y.ndim == 1:
        y = one_hot(y, s.shape[1])
    if y.shape != s.shape:
        raise InputError(f"labels {y.shape} and scores {s.shape} differ in shape")
    yv = sv = None
    if y_val is not None:
        sv = np.asarray(s_val, dtype=np.float64)
        yv = np.asarray(y_val)
        if yv.ndim == 1:
            yv = one_hot(yv, sv.shape[1])
    names = _class_names(s.shape[1], class_names)
    per, skipped = {}, []
    for j, name in enumerate(names):
        if y[:, j].sum() in (0, y.shape[0]) or (yv is not None and yv[:, j].sum() == 0):
            skipped.append(name)
            continue
        per[name] = evaluate_binary(
            y[:, j], s[:, j], y_val=None if yv is None else yv[:, j],
            s_val=None if sv is None else sv[:, j],
            n_resamples=n_resamples, seed=seed + j, confidence=confidence)
    if not per:
        raise InputError("every class has a single label value; nothing to evaluate")
    out = {"per_class": per, "skipped": skipped}
    for m in ("auroc", "auprc", "f1", "mcc"):
        out[f"mean_{m}"] = float(np.mean([getattr(r, m).value for r in per.values()]))
    return out


def evaluate_subtypes(subtypes, scores, *, class_names: Sequence[str], val_subtypes=None,
                      val_scores=None, among=None, val_among=None, groups=None, **kwargs) -> dict:
    """One-vs-rest results per ILD subtype (paper 000 Table 4).

    Parameters
    ----------
    subtypes : (n,) sequence of str or None
        Each scan's subtype (None for no ILD or unknown).
    scores : (n, K) array
        Subtype probabilities, one column per ``class_names`` entry.
    class_names : sequence of str
        Subtype names, matched case-insensitively to ``subtypes``.
    val_subtypes, val_scores : optional
        Validation data for the F1 thresholds.
    among, val_among : (n,) bool arrays, optional
        Restrict to these scans (e.g. ILD-positive scans only); default all scans.
    groups : (n,) sequence, optional
        Patient id of each scan: patient-level bootstrap (restricted by ``among`` as well).
    **kwargs
        Passed to ``evaluate_binary``.

    Returns
    -------
    dict
        Subtype name -> ``BinaryReport``; subtypes without positives (or only positives) are
        left out.
    """
    def prep(labels, sc, mask):
        sc = np.asarray(sc, dtype=np.float64)
        lab = np.array([(str(x).strip().lower() if x is not None else "") for x in labels])
        if sc.ndim != 2 or sc.shape != (lab.size, len(class_names)):
            raise InputError(f"subtype scores must be ({lab.size}, {len(class_names)}), "
                             f"got {sc.shape}")
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            lab, sc = lab[mask], sc[mask]
        return lab, sc

    lab, sc = prep(subtypes, scores, among)
    if groups is not None:
        groups = list(groups) if among is None else [g for g, keep in zip(groups, np.asarray(among, bool)) if keep]
    vlab = vsc = None
    if val_subtypes is not None:
        vlab, vsc = prep(val_subtypes, val_scores, val_among)
    out = {}
    for j, name in enumerate(class_names):
        y = (lab == name.strip().lower()).astype(np.int64)
        if y.sum() in (0, y.size):
            continue
        kw = dict(kwargs)
        if vlab is not None:
            yv = (vlab == name.strip().lower()).astype(np.int64)
            if yv.sum() > 0:
                kw.update(y_val=yv, s_val=vsc[:, j])
        out[name] = evaluate_binary(y, sc[:, j], groups=groups, **kw)
    return out


def report_as_dict(report: BinaryReport) -> dict:
    """Nested plain-dict form (JSON-ready) of a ``BinaryReport``."""
    return asdict(report)
