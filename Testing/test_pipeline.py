import numpy as np
import pytest

from conftest import tiny_settings
from ZeroShotILDLib.errors import InputError
from ZeroShotILDLib.pipeline import Analyzer
from ZeroShotILDLib.progress import CancelToken
from ZeroShotILDLib.errors import Cancelled


@pytest.fixture(scope="module")
def analyzed(small_scan, tiny_model):
    analyzer = Analyzer(tiny_settings(top_k=10), model=tiny_model)
    return analyzer, analyzer.analyze(small_scan)


def test_result_is_complete(analyzed, small_scan):
    _, r = analyzed
    n = len(r.patches)
    assert n > 16
    assert r.lung_mask.shape == small_scan.hu.shape and r.lung_mask.any()
    assert r.lung_volume_ml > 100
    p = r.patch_probabilities["interstitial lung disease"]
    assert p.shape == (n,) and np.all((p > 0) & (p < 1))
    # Top patches come from the boxes passing the lung-fraction filter; the rest are scored for the extent.
    eligible = r.patches.lung_fraction >= r.settings.filter_threshold
    assert 0 < eligible.sum() < n and r.zones["scored_share"] >= 0.98
    assert len(r.ranked) == 10 and p[r.ranked[0]] == p[eligible].max() and eligible[r.ranked].all()
    assert np.all(np.diff(p[r.ranked]) <= 0)
    assert r.montage.shape == (64, 64) and r.montage.dtype == np.uint8 and r.montage.max() > 0
    assert len(r.montage_indices) == 16
    assert set(r.subtype_probabilities) == {"idiopathic pulmonary fibrosis", "systemic sclerosis",
                                            "hypersensitivity pneumonitis"}
    assert r.encoded_exactly == n
    assert any("random weights" in note for note in r.notes)


def test_reprompt_reuses_patch_embeddings(analyzed):
    analyzer, first = analyzed
    before = analyzer.encoder.images_encoded
    r = analyzer.reprompt(["honeycombing"], subtypes=["sarcoidosis"])
    # Only the new montage is encoded: one image, no patches.
    assert analyzer.encoder.images_encoded - before == 1
    assert list(r.finding_probabilities) == ["honeycombing"]
    assert list(r.subtype_probabilities) == ["sarcoidosis"]
    assert not np.allclose(r.patch_probabilities["honeycombing"], first.patch_probabilities["interstitial lung disease"])
    back = analyzer.reprompt(["interstitial lung disease"], subtypes=list(first.subtype_probabilities))
    np.testing.assert_allclose(back.patch_probabilities["interstitial lung disease"],
                               first.patch_probabilities["interstitial lung disease"])
    assert back.finding_probabilities == pytest.approx(first.finding_probabilities)


def test_reprompt_refuses_patch_changes(analyzed):
    analyzer, _ = analyzed
    with pytest.raises(InputError, match="analyze"):
        analyzer.reprompt(patch_mm=10.0)


def test_custom_negative_and_random_retrieval(small_scan, tiny_model):
    a = Analyzer(tiny_settings(prompts=["honeycombing"], negatives=["normal lung"], retrieval="random", seed=5),
                 model=tiny_model)
    r1 = a.analyze(small_scan)
    r2 = Analyzer(tiny_settings(prompts=["honeycombing"], negatives=["normal lung"], retrieval="random", seed=5),
                  model=tiny_model).analyze(small_scan)
    np.testing.assert_array_equal(r1.montage_indices, r2.montage_indices)
    r3 = a.reprompt(seed=6)
    assert not np.array_equal(r1.montage_indices, r3.montage_indices)


def test_empty_prompt_is_refused(tiny_model):
    with pytest.raises(InputError, match="empty prompt"):
        Analyzer(tiny_settings(prompts=["  "]), model=tiny_model)


def test_cancel_stops_the_run(small_scan, tiny_model):
    token = CancelToken()
    seen = []

    def progress(stage, done, total):
        seen.append(stage)
        if stage == "encoding patches" and done > 0:
            token.cancel()

    with pytest.raises(Cancelled):
        Analyzer(tiny_settings(batch_size=8), model=tiny_model, progress=progress, cancel=token).analyze(small_scan)
    assert "encoding patches" in seen


def test_disk_cache_skips_encoding_on_reopen(small_scan, tiny_model, tmp_path):
    from ZeroShotILDLib.embeddings import EmbeddingCache

    first = Analyzer(tiny_settings(), model=tiny_model, cache=EmbeddingCache(tmp_path))
    r1 = first.analyze(small_scan)
    second = Analyzer(tiny_settings(), model=tiny_model, cache=EmbeddingCache(tmp_path))
    r2 = second.analyze(small_scan)
    assert second.encoder.images_encoded == 1  # the montage only
    np.testing.assert_allclose(r1.patch_probabilities["interstitial lung disease"],
                               r2.patch_probabilities["interstitial lung disease"])
