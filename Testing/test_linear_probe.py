"""K-shot sampling, linear probing, zero-shot prototypes and the base/new report (paper 002)."""
import numpy as np
import pytest

sk = pytest.importorskip("sklearn.metrics")

from ZeroShotILDLib.errors import InputError
from zeroshot_ild_train.linear_probe import (
    base_new_report,
    classification_metrics,
    fit_linear_probe,
    linear_probe_eval,
    sample_k_shot,
    zero_shot_probabilities,
)


def _blobs(seed, n_per_class=(40, 30), n_classes=6, dim=32, spread=1.0):
    """Gaussian classes around random directions; returns train/test features, labels, means."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(n_classes, dim))
    means = 3.0 * means / np.linalg.norm(means, axis=1, keepdims=True)
    out = []
    for n in n_per_class:
        y = np.repeat(np.arange(n_classes), n)
        x = means[y] + spread * rng.normal(size=(y.size, dim)) / np.sqrt(dim) * 3
        out += [x, y]
    return (*out, means)


def test_sample_k_shot():
    y = np.repeat(np.arange(4), [20, 16, 30, 25])
    idx = sample_k_shot(y, 16, seed=3)
    assert idx.size == 64 and np.array_equal(np.bincount(y[idx]), [16] * 4)
    assert np.unique(idx).size == 64
    assert np.array_equal(idx, sample_k_shot(y, 16, seed=3))
    assert not np.array_equal(idx, sample_k_shot(y, 16, seed=4))
    sub = sample_k_shot(y, 5, seed=0, classes=[0, 2])
    assert set(y[sub]) == {0, 2}
    with pytest.raises(InputError, match="class 1 has 16 training cases; 17-shot needs 17"):
        sample_k_shot(y, 17)


def test_probe_learns_separable_classes_and_reports_metrics():
    xtr, ytr, xte, yte, _ = _blobs(0)
    res = linear_probe_eval(xtr, ytr, xte, yte, k=16, seeds=(0, 1, 2))
    assert len(res["runs"]) == 3 and res["k"] == 16
    assert res["aca_mean"] > 0.9 and res["auroc_mean"] > 0.97  # chance: 1/6 and 0.5
    # Shuffled training labels: nothing to learn.
    rng = np.random.default_rng(1)
    bad = linear_probe_eval(xtr, rng.permutation(ytr), xte, yte, k=16, seeds=(0, 1))
    assert bad["aca_mean"] < 0.45


def test_probe_on_a_class_subset_fills_other_columns_with_zero():
    xtr, ytr, xte, yte, _ = _blobs(2)
    keep = np.isin(ytr, [0, 2, 4])
    probe = fit_linear_probe(xtr[keep], ytr[keep], n_classes=6)
    p = probe.predict_proba(xte)
    assert p.shape == (xte.shape[0], 6)
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert (p[:, [1, 3, 5]] == 0).all()
    with pytest.raises(InputError, match="at least 2 classes"):
        fit_linear_probe(xtr[ytr == 0], ytr[ytr == 0])


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 4, 150)
    p = rng.random((150, 4)) + 0.8 * np.eye(4)[y]
    p /= p.sum(1, keepdims=True)
    m = classification_metrics(y, p)
    assert abs(m["aca"] - sk.balanced_accuracy_score(y, p.argmax(1))) < 1e-12
    assert abs(m["accuracy"] - sk.accuracy_score(y, p.argmax(1))) < 1e-12
    assert abs(m["auroc"] - sk.roc_auc_score(y, p, multi_class="ovr")) < 1e-12
    two = y < 2
    m2 = classification_metrics(y[two], p[two], classes=[0, 1])
    assert abs(m2["auroc"] - sk.roc_auc_score(y[two], p[two][:, 1])) < 1e-12
    with pytest.raises(InputError, match="outside the evaluated classes"):
        classification_metrics(y, p, classes=[0, 1])


def test_zero_shot_prototypes():
    xtr, ytr, xte, yte, means = _blobs(5)
    p = zero_shot_probabilities(xte, means)
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert classification_metrics(yte, p)["aca"] > 0.9
    # Only the named classes compete.
    q = zero_shot_probabilities(xte, means, classes=[1, 3])
    assert (q[:, [0, 2, 4, 5]] == 0).all()
    with pytest.raises(InputError, match="differ in dimension"):
        zero_shot_probabilities(xte, means[:, :8])
    with pytest.raises(InputError, match="all zeros"):
        zero_shot_probabilities(np.zeros((2, 32)), means)


def test_base_new_report():
    xtr, ytr, xte, yte, means = _blobs(6)
    rng = np.random.default_rng(0)
    text = means + 0.3 * rng.normal(size=means.shape)  # text prototypes near the image classes
    names = ["NoF", "Atel", "Card", "PnMo", "Fib", "Emph"]
    rep = base_new_report(xtr, ytr, xte, yte, text, base_classes=[0, 1, 2], class_names=names,
                          k=8, seeds=(0, 1))
    assert rep["base"]["classes"] == ["NoF", "Atel", "Card"]
    assert rep["new"]["classes"] == ["PnMo", "Fib", "Emph"]
    assert rep["new"]["zero_shot"]["n"] == 90 and rep["new"]["zero_shot"]["n_classes"] == 3
    assert rep["new"]["zero_shot"]["aca"] > 0.9
    assert rep["base"]["linear_probe"]["aca_mean"] > 0.9
    assert 0.9 < rep["zero_shot_hmean"] <= 1.0
    # Text prototypes that name the wrong classes: zero-shot on new collapses, the probe on
    # image features does not care.
    wrong = text[[0, 1, 2, 4, 5, 3]]
    rep2 = base_new_report(xtr, ytr, xte, yte, wrong, base_classes=[0, 1, 2], k=8, seeds=(0,))
    assert rep2["new"]["zero_shot"]["aca"] < 0.1
    assert rep2["new"]["linear_probe"]["aca_mean"] > 0.9
    # Paper 002's "Avg." is the arithmetic mean of base and new; the harmonic mean is an extra.
    b, n = rep2["base"]["zero_shot"]["aca"], rep2["new"]["zero_shot"]["aca"]
    assert rep2["zero_shot_avg"] == pytest.approx((b + n) / 2)
    assert rep2["zero_shot_hmean"] == pytest.approx(2 * b * n / (b + n)) and rep2["zero_shot_hmean"] < rep2["zero_shot_avg"]
    lb, ln = rep2["base"]["linear_probe"]["aca_mean"], rep2["new"]["linear_probe"]["aca_mean"]
    assert rep2["linear_probe_avg"] == pytest.approx((lb + ln) / 2)
    with pytest.raises(InputError, match="at least 2 classes on each side"):
        base_new_report(xtr, ytr, xte, yte, text, base_classes=[0, 1, 2, 3, 4])
