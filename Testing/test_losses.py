"""training.losses against hand-computed small cases.

Expected values are written out in closed form (CLIP, the relaxed similarity) or computed by
plain numpy loops that follow the papers' equations term by term (NT-Xent eq. 6, UniCLIP eq. 9,
UniCL's positive sets, DLILP) -- never with the vectorised code under test.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zeroshot_ild_train import losses


def _unit(rows) -> torch.Tensor:
    t = torch.tensor(rows, dtype=torch.float64)
    return t / t.norm(dim=1, keepdim=True)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------------------------
# Relaxed similarity (paper 001, eq. 3)
# ---------------------------------------------------------------------------------------------
def test_relaxed_similarity_each_piece():
    s = torch.tensor([0.9, 0.7, 0.5, 0.25, 0.0, -0.3], dtype=torch.float64)
    out = losses.relaxed_similarity(s, threshold=0.5, slope=10.0)
    expected = [_sigmoid(4.0), _sigmoid(2.0), 0.5, 0.25, 0.0, -0.3]
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)
    # With t = 0.4 the middle piece is s / 0.8 and the sigmoid is centred on 0.4.
    s = torch.tensor([0.2, 0.6, 0.4], dtype=torch.float64)
    out = losses.relaxed_similarity(s, threshold=0.4, slope=5.0)
    np.testing.assert_allclose(out.numpy(), [0.25, _sigmoid(1.0), 0.5], atol=1e-12)


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.8])
def test_relaxed_similarity_is_continuous_at_threshold_and_zero(threshold):
    eps = 1e-7
    s = torch.tensor([threshold - eps, threshold, threshold + eps, -eps, 0.0, eps], dtype=torch.float64)
    out = losses.relaxed_similarity(s, threshold=threshold, slope=10.0).numpy()
    np.testing.assert_allclose(out[:3], 0.5, atol=1e-5)  # both sides meet at 0.5
    np.testing.assert_allclose(out[3:], 0.0, atol=1e-5)  # both sides meet at 0
    # A jump anywhere would show on a fine grid: neighbouring values stay close.
    grid = torch.linspace(-1, 1, 20001, dtype=torch.float64)
    values = losses.relaxed_similarity(grid, threshold=threshold, slope=10.0)
    assert float(values.diff().abs().max()) < 10.0 * 1e-4 / 4 + 1e-3


def test_relaxed_similarity_rejects_threshold_outside_unit_interval():
    with pytest.raises(ValueError):
        losses.relaxed_similarity(torch.zeros(2), threshold=1.0)


# ---------------------------------------------------------------------------------------------
# CLIP (eqs. 4-5), with and without relaxation
# ---------------------------------------------------------------------------------------------
# u1=(1,0), u2=(0,1); v1=(1,0), v2=(0.6,0.8)  ->  u.v = [[1, 0.6], [0, 0.8]], scale 2.
U = [[1.0, 0.0], [0.0, 1.0]]
V = [[1.0, 0.0], [0.6, 0.8]]


def test_clip_loss_hand_computed():
    loss = losses.clip_loss(_unit(U), _unit(V), 2.0)
    # logits [[2, 1.2], [0, 1.6]]; each 2-way CE is log(1 + e^(other - own)).
    rows = math.log1p(math.exp(1.2 - 2.0)) + math.log1p(math.exp(0.0 - 1.6))
    cols = math.log1p(math.exp(0.0 - 2.0)) + math.log1p(math.exp(1.2 - 1.6))
    assert float(loss) == pytest.approx((rows / 2 + cols / 2) / 2, abs=1e-12)


def test_relaxed_clip_loss_hand_computed():
    loss = losses.clip_loss(_unit(U), _unit(V), 2.0, relaxed=True, threshold=0.5, slope=10.0)
    d1, d2 = 2 * _sigmoid(10 * 0.5), 2 * _sigmoid(10 * 0.3)  # diagonal 1.0 and 0.8 are >= t
    rows = math.log1p(math.exp(1.2 - d1)) + math.log1p(math.exp(0.0 - d2))
    cols = math.log1p(math.exp(0.0 - d1)) + math.log1p(math.exp(1.2 - d2))
    assert float(loss) == pytest.approx((rows + cols) / 4, abs=1e-12)
    # Only the diagonal is relaxed: an off-diagonal similarity above t keeps its raw value.
    assert float(loss) != pytest.approx(float(losses.clip_loss(_unit(U), _unit(V), 2.0)), abs=1e-3)


def test_clip_loss_gradient_is_finite_at_the_seams():
    # Positives exactly at s = t and s = 0, where the pieces of eq. 3 meet.
    u = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    v = _unit([[0.5, math.sqrt(0.75)], [0.0, 1.0]])
    loss = losses.clip_loss(u, v, 10.0, relaxed=True)
    loss.backward()
    assert torch.isfinite(u.grad).all()


# ---------------------------------------------------------------------------------------------
# SLIP (eqs. 6-8)
# ---------------------------------------------------------------------------------------------
def _nt_xent_reference(a: np.ndarray, b: np.ndarray, tau: float) -> float:
    z = np.concatenate([a, b])
    n = len(a)
    total = 0.0
    for i in range(2 * n):
        pos = i + n if i < n else i - n
        denom = sum(math.exp(z[i] @ z[j] / tau) for j in range(2 * n) if j != i)
        total += -math.log(math.exp(z[i] @ z[pos] / tau) / denom)
    return total / (2 * n)


def test_nt_xent_matches_equation_6():
    a = _unit([[1.0, 0.2, 0.0], [0.0, 1.0, 0.3], [0.5, 0.5, 1.0]])
    b = _unit([[0.9, 0.1, 0.1], [0.2, 1.0, 0.0], [0.3, 0.6, 0.9]])
    expected = _nt_xent_reference(a.numpy(), b.numpy(), 0.5)
    assert float(losses.nt_xent_loss(a, b, temperature=0.5)) == pytest.approx(expected, abs=1e-10)


def test_nt_xent_two_pairs_closed_form():
    # a1 = b1 = e1, a2 = b2 = e2 (orthogonal): each view sees its twin at 1, two others at 0.
    e = _unit([[1.0, 0.0], [0.0, 1.0]])
    tau = 0.5
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2.0))
    assert float(losses.nt_xent_loss(e, e, temperature=tau)) == pytest.approx(expected, abs=1e-12)


def test_slip_is_clip_plus_weighted_ssl():
    a = _unit([[1.0, 0.2], [0.1, 1.0]])
    b = _unit([[0.8, 0.3], [0.2, 0.9]])
    weight, tau = 0.5, 0.2
    expected = float(losses.clip_loss(_unit(U), _unit(V), 2.0)) + weight * _nt_xent_reference(a.numpy(), b.numpy(), tau)
    got = losses.slip_loss(_unit(U), _unit(V), a, b, 2.0, ssl_weight=weight, ssl_temperature=tau)
    assert float(got) == pytest.approx(expected, abs=1e-10)


# ---------------------------------------------------------------------------------------------
# UniCLIP (eqs. 9-10)
# ---------------------------------------------------------------------------------------------
def _uniclip_reference(z: np.ndarray, n: int, scale: float, relax=None) -> float:
    """Eq. 9 written out: three terms per row, each excluding the row's other two positives."""
    def sim(i, j):
        s = float(z[i] @ z[j])
        k_i, k_j = i % n, j % n
        text_i, text_j = i >= 2 * n, j >= 2 * n
        if relax is not None and k_i == k_j and text_i != text_j:
            t, alpha = relax
            s = _sigmoid(alpha * (s - t)) if s >= t else (s / (2 * t) if s >= 0 else s)
        return s

    total = 0.0
    for i in range(3 * n):
        k = i % n
        positives = [k, k + n, k + 2 * n]
        terms = 0.0
        for p in positives:
            excluded = [q for q in positives if q != p]
            denom = sum(math.exp(scale * sim(i, j)) for j in range(3 * n) if j not in excluded)
            terms += math.log(math.exp(scale * sim(i, p)) / denom)
        total += -terms / 3
    return total / (3 * n)


@pytest.mark.parametrize("relaxed", [False, True])
def test_uniclip_matches_equation_9(relaxed):
    original = _unit([[1.0, 0.0, 0.2], [0.0, 1.0, 0.1]])
    weak = _unit([[0.9, 0.1, 0.2], [0.1, 0.9, 0.3]])
    text = _unit([[0.8, 0.3, 0.0], [0.2, 0.7, 0.6]])
    z = torch.cat([original, weak, text]).numpy()
    expected = _uniclip_reference(z, 2, 3.0, relax=(0.5, 10.0) if relaxed else None)
    got = losses.uniclip_loss(original, weak, text, 3.0, relaxed=relaxed, threshold=0.5, slope=10.0)
    assert float(got) == pytest.approx(expected, abs=1e-10)


def test_uniclip_single_sample_closed_form():
    # N = 1: no negatives, so each term is log(1) and the loss is 0.
    one = _unit([[1.0, 0.0]])
    assert float(losses.uniclip_loss(one, one, _unit([[0.0, 1.0]]), 5.0)) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# UniCL and DLILP (paper 002)
# ---------------------------------------------------------------------------------------------
LABELS = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=torch.float64)


def test_unicl_targets_by_hand():
    expected = np.array([
        [1, 1, 0, 0],  # shares class 0 with sample 1
        [1, 1, 1, 0],
        [0, 1, 1, 0],
        [0, 0, 0, 1],  # no labels: only its own text
    ], dtype=float)
    np.testing.assert_array_equal(losses.unicl_targets(LABELS).numpy(), expected)


def _log_softmax_row(values: np.ndarray, k: int) -> float:
    return float(values[k] - math.log(sum(math.exp(v) for v in values)))


def _unicl_reference(u: np.ndarray, v: np.ndarray, labels: np.ndarray, scale: float) -> float:
    n = len(u)
    logits = scale * u @ v.T

    def positive(i, j):
        return i == j or bool((labels[i] * labels[j]).sum() > 0)

    i2t = []
    for i in range(n):
        pos = [j for j in range(n) if positive(i, j)]
        i2t.append(-sum(_log_softmax_row(logits[i], j) for j in pos) / len(pos))
    t2i = []
    for j in range(n):
        pos = [i for i in range(n) if positive(i, j)]
        t2i.append(-sum(_log_softmax_row(logits[:, j], i) for i in pos) / len(pos))
    return (np.mean(i2t) + np.mean(t2i)) / 2


def _features(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def test_unicl_matches_positive_sets():
    u, v = _features(4, 5, 1), _features(4, 5, 2)
    expected = _unicl_reference(u.numpy(), v.numpy(), LABELS.numpy(), 4.0)
    assert float(losses.unicl_loss(u, v, LABELS, 4.0)) == pytest.approx(expected, abs=1e-10)


def test_unicl_with_distinct_labels_is_clip():
    u, v = _features(3, 4, 3), _features(3, 4, 4)
    distinct = torch.eye(3, dtype=torch.float64)
    assert float(losses.unicl_loss(u, v, distinct, 3.0)) == pytest.approx(float(losses.clip_loss(u, v, 3.0)), abs=1e-12)


def _prototype_reference(f: np.ndarray, w: np.ndarray, labels: np.ndarray, scale: float) -> float:
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    logits = scale * f @ w.T
    n, c = labels.shape
    i2t = [-np.mean([_log_softmax_row(logits[i], k) for k in range(c) if labels[i, k]])
           for i in range(n) if labels[i].sum() > 0]
    t2i = [-np.mean([_log_softmax_row(logits[:, k], i) for i in range(n) if labels[i, k]])
           for k in range(c) if labels[:, k].sum() > 0]
    return (np.mean(i2t) + np.mean(t2i)) / 2


def test_prototype_unicl_matches_reference():
    f = _features(4, 3, 5)
    prototypes = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.5, 0.5]], dtype=torch.float64)  # any norm
    expected = _prototype_reference(f.numpy(), prototypes.numpy(), LABELS.numpy(), 2.5)
    assert float(losses.prototype_unicl_loss(f, prototypes, LABELS, 2.5)) == pytest.approx(expected, abs=1e-10)


def test_prototype_unicl_two_samples_closed_form():
    # Images on the prototypes, one label each: every CE is log(1 + e^(s*(0 - 1))).
    f = _unit([[1.0, 0.0], [0.0, 1.0]])
    prototypes = _unit([[1.0, 0.0], [0.0, 1.0]])
    scale = 2.0
    expected = math.log1p(math.exp(-scale))
    got = losses.prototype_unicl_loss(f, prototypes, torch.eye(2, dtype=torch.float64), scale)
    assert float(got) == pytest.approx(expected, abs=1e-12)


def test_dlilp_combines_label_and_text_terms_over_samples_with_text():
    label_f, image_f, text_f = _features(4, 3, 6), _features(4, 3, 7), _features(4, 3, 8)
    prototypes = _features(2, 3, 9)
    has_text = torch.tensor([True, False, True, True])
    got = losses.dlilp_loss(label_f, prototypes, LABELS, image_f, text_f, has_text, 3.0, 2.0, text_weight=0.1)

    keep = [0, 2, 3]
    ui, vt = image_f.numpy()[keep], text_f.numpy()[keep]
    logits = 2.0 * ui @ vt.T
    clip = (np.mean([-_log_softmax_row(logits[i], i) for i in range(3)])
            + np.mean([-_log_softmax_row(logits[:, i], i) for i in range(3)])) / 2
    expected = _prototype_reference(label_f.numpy(), prototypes.numpy(), LABELS.numpy(), 3.0) + 0.1 * clip
    assert float(got) == pytest.approx(expected, abs=1e-10)

    # The text of a sample without a report does not matter.
    text_changed = text_f.clone()
    text_changed[1] = -text_changed[1]
    again = losses.dlilp_loss(label_f, prototypes, LABELS, image_f, text_changed, has_text, 3.0, 2.0, text_weight=0.1)
    assert float(again) == pytest.approx(float(got), abs=1e-12)


def test_dlilp_without_any_text_is_the_label_term():
    label_f, image_f, text_f = _features(4, 3, 10), _features(4, 3, 11), _features(4, 3, 12)
    prototypes = _features(2, 3, 13)
    none = torch.zeros(4, dtype=torch.bool)
    got = losses.dlilp_loss(label_f, prototypes, LABELS, image_f, text_f, none, 3.0, 2.0)
    expected = _prototype_reference(label_f.numpy(), prototypes.numpy(), LABELS.numpy(), 3.0)
    assert float(got) == pytest.approx(expected, abs=1e-10)


# ---------------------------------------------------------------------------------------------
# Against an independent implementation and against finite differences
# ---------------------------------------------------------------------------------------------
def _random_unit(n: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("n,scale", [(2, 1.0), (8, 14.3), (16, 100.0)])
def test_clip_loss_equals_open_clip_cliploss(n, scale):
    open_clip_loss = pytest.importorskip("open_clip.loss")
    image, text = _random_unit(n, 32, 1), _random_unit(n, 32, 2)
    reference = open_clip_loss.ClipLoss()(image, text, torch.tensor(scale, dtype=torch.float64))
    assert float(losses.clip_loss(image, text, scale)) == pytest.approx(float(reference), rel=1e-12, abs=1e-12)


def test_relaxed_clip_equals_clip_bit_for_bit_below_threshold():
    # Positive cosines all below t = 0.5: eq. 3 is s/(2t) = s there, so nothing changes at all.
    image = _random_unit(8, 64, 3, torch.float32)
    text = _random_unit(8, 64, 4, torch.float32)
    assert float((image * text).sum(1).max()) < 0.5
    assert not bool(losses.relaxation_active((image * text).sum(1)).any())
    assert torch.equal(losses.clip_loss(image, text, 20.0, relaxed=True), losses.clip_loss(image, text, 20.0))
    # A positive pair above t switches the relaxation on and the loss changes.
    text2 = text.clone()
    text2[0] = 0.6 * image[0] + 0.8 * text[0]  # cosine about 0.6
    text2[0] = text2[0] / text2[0].norm()
    assert bool(losses.relaxation_active((image * text2).sum(1))[0])
    assert not torch.equal(losses.clip_loss(image, text2, 20.0, relaxed=True), losses.clip_loss(image, text2, 20.0))


def test_slip_with_relaxation_is_relaxed_clip_plus_ssl():
    # Reference written from eqs. 3-8 with numpy loops, not with clip_loss.
    n, scale, weight, tau = 4, 5.0, 1.0, 0.1
    image, text = _random_unit(n, 6, 5), _random_unit(n, 6, 6)
    text[1] = image[1] * 0.2 + text[1] * 0.1
    text = text / text.norm(dim=1, keepdim=True)  # one positive cosine above t
    s1, s2 = _random_unit(n, 6, 7), _random_unit(n, 6, 8)
    sim = (image @ text.t()).numpy().copy()
    assert sim[1, 1] >= 0.5
    for i in range(n):
        s = sim[i, i]
        sim[i, i] = _sigmoid(10.0 * (s - 0.5)) if s >= 0.5 else (s / 1.0 if s >= 0 else s)
    logits = scale * sim
    i2t = -np.mean([logits[i, i] - np.log(np.exp(logits[i]).sum()) for i in range(n)])
    t2i = -np.mean([logits[i, i] - np.log(np.exp(logits[:, i]).sum()) for i in range(n)])
    expected = 0.5 * (i2t + t2i) + weight * _nt_xent_reference(s1.numpy(), s2.numpy(), tau)
    got = losses.slip_loss(image, text, s1, s2, scale, ssl_weight=weight, ssl_temperature=tau, relaxed=True)
    assert float(got) == pytest.approx(expected, abs=1e-10)
    plain = losses.slip_loss(image, text, s1, s2, scale, ssl_weight=weight, ssl_temperature=tau)
    assert float(plain) != pytest.approx(expected, abs=1e-6)


def _gradcheck(fn, *tensors):
    inputs = tuple(t.detach().clone().to(torch.float64).requires_grad_(True) for t in tensors)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def _normed(*xs):
    return [x / x.norm(dim=1, keepdim=True) for x in xs]


@pytest.mark.parametrize("relaxed", [False, True])
def test_gradcheck_clip_and_relaxed(relaxed):
    image, text = _random_unit(5, 8, 9), _random_unit(5, 8, 10)
    text[0] = 0.9 * image[0] + 0.1 * text[0]  # one positive in the sigmoid piece

    def fn(a, b, scale):
        a, b = _normed(a, b)
        return losses.clip_loss(a, b, scale, relaxed=relaxed)

    _gradcheck(fn, image, text, torch.tensor(7.0))


def test_gradcheck_nt_xent_and_slip():
    a, b, c, d = (_random_unit(4, 6, s) for s in (11, 12, 13, 14))
    _gradcheck(lambda x, y: losses.nt_xent_loss(*_normed(x, y), temperature=0.2), a, b)
    _gradcheck(lambda w, t, x, y, s: losses.slip_loss(*_normed(w, t, x, y), s, relaxed=True), a, b, c, d, torch.tensor(3.0))


@pytest.mark.parametrize("relaxed", [False, True])
def test_gradcheck_uniclip(relaxed):
    o, w, t = (_random_unit(3, 6, s) for s in (15, 16, 17))
    _gradcheck(lambda x, y, z, s: losses.uniclip_loss(*_normed(x, y, z), s, relaxed=relaxed), o, w, t, torch.tensor(4.0))


def test_gradcheck_unicl_prototype_unicl_and_dlilp():
    labels = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.float64)
    image, text, label_f = (_random_unit(4, 6, s) for s in (18, 19, 20))
    prototypes = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(21))
    has_text = torch.tensor([True, False, True, True])
    _gradcheck(lambda x, y, s: losses.unicl_loss(*_normed(x, y), labels, s), image, text, torch.tensor(5.0))
    _gradcheck(lambda x, p, s: losses.prototype_unicl_loss(*_normed(x), p, labels, s), image, prototypes, torch.tensor(5.0))
    _gradcheck(lambda lf, p, x, y, s1, s2: losses.dlilp_loss(*_normed(lf), p, labels, *_normed(x, y), has_text, s1, s2),
               label_f, prototypes, image, text, torch.tensor(5.0), torch.tensor(3.0))
