"""Image-text alignment (paper 001) and retrieval recall."""
import numpy as np
import pytest

from ZeroShotILDLib.errors import InputError
from zeroshot_ild_train.alignment import (
    alignment_report,
    owners_from_counts,
    recall_at_k,
    report_level_similarity,
    sentence_level_similarity,
)


def test_hand_computed_similarities():
    img = np.array([[1.0, 0.0], [0.0, 2.0]])
    rep = np.array([[1.0, 1.0], [0.0, -1.0]])
    np.testing.assert_allclose(report_level_similarity(img, rep), [1 / np.sqrt(2), -1.0])
    # Image 0 has sentences along x and y (cos 1 and 0); image 1 has none; image 0 listed last.
    sents = np.array([[0.0, 5.0], [3.0, 0.0]])
    sim = sentence_level_similarity(img, sents, owners=[0, 0])
    assert sim[0] == pytest.approx(0.5) and np.isnan(sim[1])
    assert list(owners_from_counts([2, 0, 3])) == [0, 0, 2, 2, 2]


def test_against_loops_on_random_embeddings():
    rng = np.random.default_rng(0)
    img, rep = rng.normal(size=(30, 16)), rng.normal(size=(30, 16))
    counts = rng.integers(1, 6, 30)
    owners = owners_from_counts(counts)
    sents = rng.normal(size=(owners.size, 16))
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
    ref_sent = [np.mean([cos(img[i], sents[j]) for j in np.flatnonzero(owners == i)])
                for i in range(30)]
    out = alignment_report(img, rep, sents, owners, ks=(1, 5))
    assert out["report_mean"] == pytest.approx(np.mean([cos(img[i], rep[i]) for i in range(30)]))
    assert out["sentence_mean"] == pytest.approx(np.mean(ref_sent))
    assert out["sentence_std"] == pytest.approx(np.std(ref_sent))
    sim = np.array([[cos(a, b) for b in rep] for a in img])
    rank = [(sim[i] > sim[i, i]).sum() for i in range(30)]
    assert out["i2t@5"] == pytest.approx(np.mean(np.array(rank) < 5))
    rank_t = [(sim[:, i] > sim[i, i]).sum() for i in range(30)]
    assert out["t2i@1"] == pytest.approx(np.mean(np.array(rank_t) < 1))


def test_recall_extremes():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 8))
    assert recall_at_k(x, 3 * x, ks=(1,)) == {"i2t@1": 1.0, "t2i@1": 1.0}
    same = np.ones((20, 8))
    assert recall_at_k(same, same, ks=(1, 10)) == {"i2t@1": 0.0, "t2i@1": 0.0,
                                                  "i2t@10": 0.0, "t2i@10": 0.0}
    assert recall_at_k(x, rng.normal(size=(20, 8)), ks=(20,))["i2t@20"] == 1.0


def test_errors():
    x = np.ones((3, 4))
    with pytest.raises(InputError, match="pairs must match row for row"):
        report_level_similarity(x, np.ones((2, 4)))
    with pytest.raises(InputError, match="differ in dimension"):
        report_level_similarity(x, np.ones((3, 5)))
    with pytest.raises(InputError, match="image indices"):
        sentence_level_similarity(x, np.ones((2, 4)), owners=[0, 3])
    with pytest.raises(InputError, match="need owners"):
        alignment_report(x, x, sentence_emb=x)
