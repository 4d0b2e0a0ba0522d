"""Fast mode re-prompt with exact re-scoring (issue 10): the final answer equals a fresh analysis.

A fast-mode analysis re-scores exactly the best candidates of the prompt it was run for; a plain
re-prompt ranks a new prompt partly on proposal-pass scores (a preview). ``reprompt(exact=True)``
must give what a fresh analysis with the new prompt gives.
"""
import numpy as np
import pytest

from conftest import tiny_settings
from ZeroShotILDLib import proposals
from ZeroShotILDLib.embeddings import EmbeddingCache
from ZeroShotILDLib.errors import Cancelled
from ZeroShotILDLib.pipeline import Analyzer
from ZeroShotILDLib.progress import CancelToken

needs_bf16 = pytest.mark.skipif(not proposals.cpu_has_fast_bf16(),
                                reason="the bf16 proposal pass needs a CPU with AMX or AVX512-BF16")
# ~350 candidates with a small re-scoring set, so that the preview really differs from the exact answer.
FAST = dict(patch_mm=30.0, scoring_mode="fast", rescore_fraction=0.0, rescore_min=16, top_k=16)
FIRST, NEW = "interstitial lung disease", "emphysema"


@pytest.fixture(scope="module")
def scan():
    from ZeroShotILDLib.phantom import generate_phantom
    from ZeroShotILDLib.scan import scan_from_array

    p = generate_phantom(4, shape_zyx=(40, 128, 128), spacing_mm=(2.5, 2.5, 5.0), ild=True)
    return scan_from_array(p.hu, p.spacing_mm, p.origin_mm, p.direction, source="phantom 4")


@needs_bf16
def test_exact_reprompt_equals_a_fresh_analysis(scan, tiny_model):
    analyzer = Analyzer(tiny_settings(prompts=[FIRST], **FAST), model=tiny_model)
    analyzer.analyze(scan)
    preview = analyzer.reprompt([NEW])
    assert analyzer.needs_exact_rescoring
    exact_before = analyzer._state.exact.copy()
    assert any("proposal-pass scores" in n for n in preview.notes)

    before = analyzer.encoder.images_encoded
    final = analyzer.reprompt([NEW], exact=True)
    assert analyzer.encoder.images_encoded > before + 1  # candidates were encoded, not only the montage
    assert not analyzer.needs_exact_rescoring
    assert not any("proposal-pass scores" in n for n in final.notes)

    # A fresh analysis with the new prompt, cold (no shared cache): what the command line gives.
    cold = Analyzer(tiny_settings(prompts=[NEW], **FAST), model=tiny_model, cache=EmbeddingCache()).analyze(scan)
    np.testing.assert_array_equal(final.ranked[:16], cold.ranked[:16])
    assert final.finding_probabilities[NEW] == pytest.approx(cold.finding_probabilities[NEW], abs=0.005)
    exact_rows = analyzer._state.exact
    assert exact_rows[final.ranked].all() and exact_rows[final.montage_indices].all()

    # The preview's top patches were ranked on proposal-pass scores (otherwise this test would prove nothing).
    assert np.count_nonzero(~exact_before[preview.ranked[:16]]) >= 8

    # A second exact re-prompt with the same prompt encodes nothing but the montage.
    before = analyzer.encoder.images_encoded
    again = analyzer.reprompt([NEW], exact=True)
    assert analyzer.encoder.images_encoded == before + 1
    np.testing.assert_array_equal(again.ranked, final.ranked)


@needs_bf16
def test_exact_reprompt_equals_a_fresh_analysis_on_the_same_embeddings(scan, tiny_model):
    cache = EmbeddingCache()
    analyzer = Analyzer(tiny_settings(prompts=[FIRST], **FAST), model=tiny_model, cache=cache)
    analyzer.analyze(scan)
    cache._memory.clear()  # the kept record must be enough on its own
    final = analyzer.reprompt([NEW], exact=True)
    warm = Analyzer(tiny_settings(prompts=[NEW], **FAST), model=tiny_model, cache=cache).analyze(scan)
    np.testing.assert_array_equal(final.ranked, warm.ranked)
    np.testing.assert_array_equal(final.montage_indices, warm.montage_indices)
    np.testing.assert_allclose(final.patch_probabilities[NEW], warm.patch_probabilities[NEW], atol=1e-6)
    assert final.finding_probabilities == pytest.approx(warm.finding_probabilities, abs=1e-6)


@needs_bf16
def test_cancelled_exact_rescoring_keeps_the_preview_state(scan, tiny_model):
    token = CancelToken()
    analyzer = Analyzer(tiny_settings(prompts=[FIRST], **FAST, batch_size=4), model=tiny_model, cancel=token)
    first = analyzer.analyze(scan)
    state = analyzer._state
    token.cancel()
    with pytest.raises(Cancelled):
        analyzer.reprompt([NEW], exact=True)
    assert analyzer._state is state and analyzer.needs_exact_rescoring
    token._event.clear()
    back = analyzer.reprompt([FIRST])
    np.testing.assert_array_equal(back.ranked, first.ranked)


def test_exact_mode_needs_no_rescoring(small_scan, tiny_model):
    analyzer = Analyzer(tiny_settings(), model=tiny_model)
    analyzer.analyze(small_scan)
    before = analyzer.encoder.images_encoded
    analyzer.reprompt(["emphysema"], exact=True)
    assert not analyzer.needs_exact_rescoring and analyzer.encoder.images_encoded == before + 1
