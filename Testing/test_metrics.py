"""Metrics against scikit-learn, threshold choice, bootstrap and edge cases."""
import numpy as np
import pytest

sk = pytest.importorskip("sklearn.metrics")

from ZeroShotILDLib.errors import InputError
from zeroshot_ild_train import metrics as M


def _data(seed, n=200, ties=False, prevalence=0.4):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    y[:2] = [0, 1]
    s = rng.normal(size=n) + 0.8 * y
    if ties:
        s = np.round(s, 1)  # many tied scores
    return y, s


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_threshold_free_metrics_equal_sklearn(seed, ties):
    y, s = _data(seed, n=50 + 40 * seed, ties=ties, prevalence=0.15 + 0.1 * seed)
    assert abs(M.roc_auc(y, s) - sk.roc_auc_score(y, s)) < 1e-12
    assert abs(M.average_precision(y, s) - sk.average_precision_score(y, s)) < 1e-12
    p, r, t = M.pr_curve(y, s)
    p2, r2, t2 = sk.precision_recall_curve(y, s)
    np.testing.assert_allclose(p, p2, atol=1e-12)
    np.testing.assert_allclose(r, r2, atol=1e-12)
    np.testing.assert_allclose(t, t2, atol=0)
    fpr, tpr, thr = M.roc_curve(y, s)
    fpr2, tpr2, thr2 = sk.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, fpr2, atol=1e-12)
    np.testing.assert_allclose(tpr, tpr2, atol=1e-12)
    np.testing.assert_allclose(thr[1:], thr2[1:], atol=0)


@pytest.mark.parametrize("seed", range(4))
def test_thresholded_metrics_equal_sklearn(seed):
    y, s = _data(seed, ties=True)
    for t in (-1.0, 0.0, 0.35, 1.2, 10.0):
        pred = (s >= t).astype(int)
        assert abs(M.f1_at(y, s, t) - sk.f1_score(y, pred, zero_division=0)) < 1e-12
        assert abs(M.mcc_at(y, s, t) - sk.matthews_corrcoef(y, pred)) < 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_max_f1_threshold_is_the_best_candidate(seed):
    y, s = _data(seed, n=120, ties=seed % 2 == 0)
    thr, f1 = M.max_f1_threshold(y, s)
    brute = {t: sk.f1_score(y, (s >= t).astype(int)) for t in np.unique(s)}
    best = max(brute.values())
    assert abs(f1 - best) < 1e-12 and abs(brute[thr] - best) < 1e-12
    assert thr == max(t for t, v in brute.items() if abs(v - best) < 1e-12)


def test_evaluate_binary_uses_validation_threshold():
    yv, sv = _data(10, n=150)
    yt, st = _data(11, n=150)
    rep = M.evaluate_binary(yt, st, y_val=yv, s_val=sv, n_resamples=200, seed=1)
    thr, _ = M.max_f1_threshold(yv, sv)
    assert rep.threshold == thr and rep.threshold_source == "validation"
    assert abs(rep.f1.value - sk.f1_score(yt, (st >= thr).astype(int))) < 1e-12
    assert abs(rep.mcc.value - sk.matthews_corrcoef(yt, (st >= thr).astype(int))) < 1e-12
    assert abs(rep.auroc.value - sk.roc_auc_score(yt, st)) < 1e-12
    assert abs(rep.auprc.value - sk.average_precision_score(yt, st)) < 1e-12
    for e in (rep.auroc, rep.auprc, rep.f1, rep.mcc):
        assert e.ci_low <= e.value <= e.ci_high and e.n_resamples == 200
    d = rep.to_dict()
    assert d["threshold"] == thr and d["n"] == 150 and d["auroc_low"] == rep.auroc.ci_low
    own = M.evaluate_binary(yt, st, n_resamples=0)
    assert own.threshold_source == M.OPTIMISTIC and np.isnan(own.auroc.ci_low)
    assert own.f1.value >= rep.f1.value  # choosing on test itself is optimistic
    with pytest.raises(InputError, match="both validation labels and validation scores"):
        M.evaluate_binary(yt, st, y_val=yv)


def test_bootstrap_matches_an_independent_loop_and_redraws_single_class():
    rng = np.random.default_rng(0)
    y = np.zeros(25, dtype=int)
    y[[3, 17]] = 1  # 2 positives in 25: ~13 % of resamples have none
    s = rng.random(25) + 0.3 * y
    est = M.bootstrap_ci(M.roc_auc, y, s, n_resamples=300, seed=7)
    # Reference: same generator, sklearn's AUROC, single-class draws skipped.
    ref_rng = np.random.default_rng(7)
    vals, skipped = [], 0
    while len(vals) < 300:
        idx = ref_rng.integers(0, 25, 25)
        if y[idx].min() == y[idx].max():
            skipped += 1
            continue
        vals.append(sk.roc_auc_score(y[idx], s[idx]))
    assert est.n_resamples == 300 and est.n_redrawn == skipped > 10
    lo, hi = np.quantile(vals, [0.025, 0.975])
    assert abs(est.ci_low - lo) < 1e-12 and abs(est.ci_high - hi) < 1e-12
    assert est == M.bootstrap_ci(M.roc_auc, y, s, n_resamples=300, seed=7)
    assert "[" in str(est)


def test_bootstrap_gives_up_when_most_draws_are_single_class():
    y = np.zeros(400, dtype=int)
    y[0] = 1  # ~37 % of resamples miss the only positive; 60 draws cannot give 50 usable ones
    with pytest.raises(InputError, match="held a single class"):
        M.bootstrap_ci(M.roc_auc, y, np.arange(400.0), n_resamples=50, max_draws=60)


def test_single_class_and_bad_input_errors():
    with pytest.raises(InputError, match="AUROC needs both positive and negative cases; got only positives"):
        M.roc_auc([1, 1, 1], [0.2, 0.3, 0.4])
    with pytest.raises(InputError, match="AUPRC needs both"):
        M.average_precision([0, 0], [0.2, 0.3])
    with pytest.raises(InputError, match="validation set has no positives"):
        M.max_f1_threshold([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(InputError, match="must be 0 or 1"):
        M.roc_auc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(InputError, match="differ in length"):
        M.roc_auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(InputError, match="NaN"):
        M.roc_auc([0, 1], [0.1, float("nan")])
    with pytest.raises(InputError):
        M.bootstrap_ci(M.roc_auc, [1, 1], [0.1, 0.2])


def test_macro_auroc_and_multilabel_against_sklearn():
    rng = np.random.default_rng(3)
    Y = (rng.random((300, 4)) < [0.1, 0.3, 0.5, 0.2]).astype(int)
    S = rng.normal(size=(300, 4)) + Y
    res = M.macro_auroc(Y, S, class_names=list("abcd"))
    assert abs(res.value - sk.roc_auc_score(Y, S, average="macro")) < 1e-12
    assert res.skipped == ()
    # Single-label classes given as indices: one-vs-rest.
    lab = rng.integers(0, 3, 200)
    P = rng.random((200, 3)) + M.one_hot(lab, 3)
    P = P / P.sum(1, keepdims=True)
    assert abs(M.macro_auroc(lab, P).value
               - sk.roc_auc_score(lab, P, multi_class="ovr", average="macro")) < 1e-12
    # A class with no positives is skipped, documented as NaN.
    Y2 = Y.copy()
    Y2[:, 1] = 0
    res2 = M.macro_auroc(Y2, S, class_names=list("abcd"))
    assert res2.skipped == ("b",) and np.isnan(res2.per_class["b"])
    assert abs(res2.value - np.mean([sk.roc_auc_score(Y[:, j], S[:, j]) for j in (0, 2, 3)])) < 1e-12
    with pytest.raises(InputError, match="every class has a single label"):
        M.macro_auroc(np.zeros((5, 2), int), np.zeros((5, 2)))
    ml = M.evaluate_multilabel(Y2, S, y_val=Y, s_val=S, class_names=list("abcd"), n_resamples=0)
    assert ml["skipped"] == ["b"] and set(ml["per_class"]) == {"a", "c", "d"}
    f1s = []
    for j, name in ((0, "a"), (2, "c"), (3, "d")):
        thr, _ = M.max_f1_threshold(Y[:, j], S[:, j])
        f1s.append(sk.f1_score(Y2[:, j], (S[:, j] >= thr).astype(int)))
    assert abs(ml["mean_f1"] - np.mean(f1s)) < 1e-12


def test_subtypes_one_vs_rest_and_ensembles():
    rng = np.random.default_rng(5)
    names = ["IPF", "SSc", "HP"]
    sub = rng.choice(names + [None], size=120)
    S = rng.random((120, 3))
    res = M.evaluate_subtypes(sub, S, class_names=["ipf", "ssc", "hp"], n_resamples=0)
    y_ipf = np.array([x == "IPF" for x in sub], int)
    assert abs(res["ipf"].auroc.value - sk.roc_auc_score(y_ipf, S[:, 0])) < 1e-12
    ild = np.array([x is not None for x in sub])
    only = M.evaluate_subtypes(sub, S, class_names=["ipf", "ssc", "hp"], among=ild, n_resamples=0)
    assert only["ipf"].n == ild.sum()
    # Patient ids restricted along with ``among``: the subtype CIs resample those patients.
    pid = np.arange(120) // 2
    grouped = M.evaluate_subtypes(sub, S, class_names=["ipf", "ssc", "hp"], among=ild, groups=pid, n_resamples=50)
    assert grouped["ipf"].auroc.unit == "patients" and grouped["ipf"].n_patients == len(set(pid[ild]))
    a, b = rng.random(50), rng.random(50)
    np.testing.assert_allclose(M.ensemble_probabilities([a, b]), (a + b) / 2)
    with pytest.raises(InputError, match="disagree in shape"):
        M.ensemble_probabilities([a, b[:10]])
    y = (rng.random(50) < 0.5).astype(int)
    y[:2] = [0, 1]
    out = M.evaluate_models({"m1": (a, a), "m2": (b, b)}, y, y_val=y, n_resamples=0)
    assert set(out) == {"m1", "m2", "ensemble"}
    assert abs(out["ensemble"].auroc.value - sk.roc_auc_score(y, (a + b) / 2)) < 1e-12


def test_a_threshold_that_calls_every_scan_positive_is_flagged():
    # 9 of 16 positive; the validation set puts the threshold below every test score.
    yt = np.array([1] * 9 + [0] * 7)
    st = np.linspace(0.6, 0.9, 16)
    rep = M.evaluate_binary(yt, st, y_val=np.array([1, 0, 1]), s_val=np.array([0.2, 0.1, 0.3]), n_resamples=0)
    assert rep.f1.value == pytest.approx(sk.f1_score(yt, np.ones(16, int)))  # 0.72: looks fine
    assert rep.mcc.value == 0.0 and rep.degenerate == "the threshold calls every scan positive"
    assert rep.to_dict()["degenerate"] == rep.degenerate
    low = M.evaluate_binary(yt, st, y_val=np.array([1, 0]), s_val=np.array([0.95, 0.1]), n_resamples=0)
    assert low.degenerate == "the threshold calls every scan negative"
    fine = M.evaluate_binary(yt, np.r_[np.full(9, 0.8), np.full(7, 0.2)], n_resamples=0)
    assert fine.degenerate == "" and fine.threshold_source == M.OPTIMISTIC


def test_degenerate_rows_are_marked_in_the_tables():
    from zeroshot_ild_train import plots

    yt = np.array([1] * 9 + [0] * 7)
    flagged = M.evaluate_binary(yt, np.linspace(0.6, 0.9, 16), y_val=np.array([1, 0]), s_val=np.array([0.5, 0.1]),
                                n_resamples=0)
    fine = M.evaluate_binary(yt, np.r_[np.full(4, 0.8), np.full(12, 0.2)], y_val=np.array([1, 0]),
                             s_val=np.array([0.8, 0.2]), n_resamples=0)  # F1 8/13, below the degenerate 0.72
    table = plots.grid_markdown([plots.grid_row({"model": "a"}, flagged), plots.grid_row({"model": "b"}, fine)],
                                factors=["model"], metrics=("auroc", "f1", "mcc"))
    lines = table.splitlines()
    assert "†" in lines[2] and "†" not in lines[3]
    assert "**0.720**" not in lines[2] and "**0.615**" in lines[3]  # a degenerate F1 is never the bold best
    assert "Degenerate classifier: the threshold calls every scan positive" in table


def _patients(seed, n_patients=40):
    """Patients with 1-4 images each; a patient's images share its label and scatter around its score."""
    rng = np.random.default_rng(seed)
    y_p = (rng.random(n_patients) < 0.45).astype(int)
    y_p[:2] = [0, 1]
    s_p = rng.normal(size=n_patients) + 0.9 * y_p
    sizes = rng.integers(1, 5, n_patients)
    pid = np.repeat([f"p{i:03d}" for i in range(n_patients)], sizes)
    y = np.repeat(y_p, sizes)
    s = np.repeat(s_p, sizes) + 0.2 * rng.normal(size=y.size)
    return y, s, pid


def _independent_cluster_ci(y, s, pid, *, n_resamples, seed, confidence=0.95):
    """The documented protocol written out with scikit-learn: draw len(patients) patients with
    replacement (patients in order of first appearance), all their images enter, single-class
    resamples are redrawn, percentile interval."""
    patients = list(dict.fromkeys(pid))
    rows = {p: np.flatnonzero(pid == p) for p in patients}
    rng = np.random.default_rng(seed)
    values = []
    while len(values) < n_resamples:
        drawn = rng.integers(0, len(patients), len(patients))
        idx = np.concatenate([rows[patients[d]] for d in drawn])
        if len(set(y[idx])) < 2:
            continue
        values.append(sk.roc_auc_score(y[idx], s[idx]))
    alpha = (1 - confidence) / 2
    return np.quantile(values, [alpha, 1 - alpha])


@pytest.mark.parametrize("seed", [0, 1])
def test_patient_level_bootstrap_matches_an_independent_computation(seed):
    y, s, pid = _patients(seed)
    est = M.bootstrap_ci(M.roc_auc, y, s, n_resamples=300, seed=seed, groups=pid)
    low, high = _independent_cluster_ci(y, s, pid, n_resamples=300, seed=seed)
    assert est.unit == "patients" and est.value == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    assert (est.ci_low, est.ci_high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))


def test_patient_bootstrap_of_copied_images_equals_the_image_bootstrap_of_one_each():
    # Every patient's image copied three times: resampling patients must give exactly the interval
    # of the one-image-per-patient set (AUROC ignores copying every case), resampling images a
    # narrower, overconfident one.
    y, s = _data(3, n=60)
    pid = np.repeat(np.arange(60), 3)
    y3, s3 = np.repeat(y, 3), np.repeat(s, 3)
    one = M.bootstrap_ci(M.roc_auc, y, s, n_resamples=400, seed=5)
    patients = M.bootstrap_ci(M.roc_auc, y3, s3, n_resamples=400, seed=5, groups=pid)
    images = M.bootstrap_ci(M.roc_auc, y3, s3, n_resamples=400, seed=5)
    assert (patients.ci_low, patients.ci_high) == pytest.approx((one.ci_low, one.ci_high), abs=1e-12)
    assert images.ci_high - images.ci_low < 0.8 * (patients.ci_high - patients.ci_low)
    # One image per patient: the cluster bootstrap is the image bootstrap, draw for draw.
    same = M.bootstrap_ci(M.roc_auc, y, s, n_resamples=200, seed=2, groups=[f"p{i}" for i in range(60)])
    plain = M.bootstrap_ci(M.roc_auc, y, s, n_resamples=200, seed=2)
    assert (same.ci_low, same.ci_high) == (plain.ci_low, plain.ci_high)


def test_paired_comparison_of_two_models_on_the_same_cases():
    y, s, pid = _patients(4, n_patients=60)
    rng = np.random.default_rng(9)
    worse = s + 1.5 * rng.normal(size=s.size)
    c = M.paired_comparison(y, s, worse, names=("good", "noisy"), groups=pid, n_resamples=300, seed=1)
    assert c.auroc_a == pytest.approx(sk.roc_auc_score(y, s)) and c.auroc_b == pytest.approx(sk.roc_auc_score(y, worse))
    assert c.difference.value == pytest.approx(c.auroc_a - c.auroc_b)
    assert c.difference.ci_low > 0 and c.p_value < 0.05 and c.n_patients == 60
    # The difference's interval is the same independent protocol applied to AUROC(a) - AUROC(b).
    patients = list(dict.fromkeys(pid))
    rows = {p: np.flatnonzero(pid == p) for p in patients}
    draw = np.random.default_rng(1)
    diffs = []
    while len(diffs) < 300:
        idx = np.concatenate([rows[patients[d]] for d in draw.integers(0, len(patients), len(patients))])
        if len(set(y[idx])) == 2:
            diffs.append(sk.roc_auc_score(y[idx], s[idx]) - sk.roc_auc_score(y[idx], worse[idx]))
    assert (c.difference.ci_low, c.difference.ci_high) == pytest.approx(tuple(np.quantile(diffs, [0.025, 0.975])), abs=1e-12)
    # A model against itself: no difference, p = 1.
    same = M.paired_comparison(y, s, s, groups=pid, n_resamples=100, seed=0)
    assert same.difference.value == 0 and same.p_value == 1.0


def test_small_test_set_is_flagged():
    y, s = _data(0, n=24)
    est = M.bootstrap_ci(M.roc_auc, y, s, n_resamples=200)
    note = M.small_test_set_note(y, est, n_patients=12)
    assert note.startswith("small test set") and "12 patients" in note
    y, s = _data(0, n=2000)
    assert M.small_test_set_note(y, M.bootstrap_ci(M.roc_auc, y, s, n_resamples=100)) == ""
