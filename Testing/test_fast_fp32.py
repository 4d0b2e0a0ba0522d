"""Fast mode without native bf16 (issue 13): the fp32 proposal pass and the ZEROSHOT_ILD_CPU_BF16 switch.

Without fast bf16 the proposal pass runs the model itself in fp32 at its own input size, so each
proposal encoding is exact; the pass saves work by encoding every third 1 mm slice plus the slice
neighbours of the best boxes, and interpolating the rest for ranking.
"""
import numpy as np
import pytest

from conftest import tiny_settings
from ZeroShotILDLib import proposals
from ZeroShotILDLib.embeddings import EmbeddingCache
from ZeroShotILDLib.errors import InputError
from ZeroShotILDLib.pipeline import Analyzer

FAST = dict(scoring_mode="fast", rescore_fraction=0.0, rescore_min=32, top_k=16, slice_step_mm=1.0)


@pytest.fixture(scope="module")
def thin_scan():
    from ZeroShotILDLib.phantom import generate_phantom
    from ZeroShotILDLib.scan import scan_from_array

    p = generate_phantom(5, shape_zyx=(60, 128, 128), spacing_mm=(2.5, 2.5, 1.0), ild=True)
    return scan_from_array(p.hu, p.spacing_mm, p.origin_mm, p.direction, source="phantom 5")


def test_environment_switch(monkeypatch):
    monkeypatch.setenv(proposals.CPU_BF16_ENV, "0")
    assert proposals.cpu_has_fast_bf16() is False
    monkeypatch.setenv(proposals.CPU_BF16_ENV, "1")
    assert proposals.cpu_has_fast_bf16() is True
    monkeypatch.setenv(proposals.CPU_BF16_ENV, " 0 ")
    assert proposals.cpu_has_fast_bf16() is False
    monkeypatch.setenv(proposals.CPU_BF16_ENV, "yes")
    with pytest.raises(InputError, match="ZEROSHOT_ILD_CPU_BF16='yes'.*0.*1"):
        proposals.cpu_has_fast_bf16()
    monkeypatch.delenv(proposals.CPU_BF16_ENV)
    assert proposals.cpu_has_fast_bf16() == proposals._cpuinfo_has_bf16()


def test_proposal_tower_follows_the_switch(monkeypatch, tiny_model):
    monkeypatch.setenv(proposals.CPU_BF16_ENV, "0")
    fp32 = proposals.proposal_model(tiny_model)
    assert fp32 is tiny_model and proposals.proposal_precision(fp32) == "fp32"
    assert proposals.proposals_are_exact(fp32, tiny_model, proposals.full_grid_tokens(tiny_model))
    assert not proposals.proposals_are_exact(fp32, tiny_model, 2)
    monkeypatch.setenv(proposals.CPU_BF16_ENV, "1")
    bf16 = proposals.proposal_model(tiny_model)
    assert bf16 is not tiny_model and proposals.proposal_precision(bf16) == "bf16"
    assert not proposals.proposals_are_exact(bf16, tiny_model, proposals.full_grid_tokens(tiny_model))


def test_a_bad_switch_value_is_a_one_line_input_error(monkeypatch, thin_scan, tiny_model):
    monkeypatch.setenv(proposals.CPU_BF16_ENV, "true")
    with pytest.raises(InputError, match="ZEROSHOT_ILD_CPU_BF16") as info:
        Analyzer(tiny_settings(**FAST), model=tiny_model).analyze(thin_scan)
    assert "\n" not in str(info.value)


def test_expected_proposals_and_pay_off():
    # every third slice of 3,000 candidates, 66 re-scored: refinement adds at most 2 x 66 x 4 encodings
    assert proposals.expected_proposals(1_100, 3_000, 66, 3) == 1_100 + 528
    assert proposals.expected_proposals(900, 1_000, 66, 3) == 1_000
    assert proposals.expected_proposals(1_000, 1_000, 66, 1) == 1_000
    # fp32 at full size: pays only when slices are skipped
    assert proposals.proposals_pay_off(3_000, 66, 7, 7, proposals.FP32_RELATIVE_COST, n_proposals=1_628)
    assert not proposals.proposals_pay_off(3_000, 66, 7, 7, proposals.FP32_RELATIVE_COST, n_proposals=3_000)


def _thin_phantom(seed):
    from ZeroShotILDLib.phantom import generate_phantom
    from ZeroShotILDLib.scan import scan_from_array

    p = generate_phantom(seed, shape_zyx=(60, 128, 128), spacing_mm=(2.5, 2.5, 1.0), ild=True)
    return scan_from_array(p.hu, p.spacing_mm, p.origin_mm, p.direction, source=f"phantom {seed}")


@pytest.mark.parametrize("model_name", ["tiny-random", "phantom-demo"])
def test_fp32_fast_mode_keeps_the_exact_top_patches(monkeypatch, model_name):
    from ZeroShotILDLib.models import load_model

    monkeypatch.setenv(proposals.CPU_BF16_ENV, "0")
    model = load_model(model_name, device="cpu")
    base = dict(model=model_name, patch_mm=30.0)
    kept = []
    for seed in (5, 6, 7):
        scan = _thin_phantom(seed)
        exact = Analyzer(tiny_settings(**base, slice_step_mm=1.0, top_k=16), model=model).analyze(scan)
        analyzer = Analyzer(tiny_settings(**base, **FAST), model=model)
        fast = analyzer.analyze(scan)
        n = len(exact.patches)
        assert len(fast.patches) == n
        assert analyzer._fast_model is model  # the fp32 path: the model itself, no bf16 copy
        note = next(x for x in fast.notes if x.startswith("fast mode"))
        assert "fp32 proposal pass" in note and "interpolated" in note
        # Fewer encodings than candidates, and every encoding of the model is an exact one.
        assert fast.encoded_exactly < 0.85 * n
        assert analyzer.encoder.images_encoded == fast.encoded_exactly + 1  # + the montage
        kept.append(len(set(exact.ranked[:16].tolist()) & set(fast.ranked[:16].tolist())))
        for k, p in {**exact.finding_probabilities, **exact.subtype_probabilities}.items():
            assert abs({**fast.finding_probabilities, **fast.subtype_probabilities}[k] - p) <= 0.005
        rows = np.flatnonzero(analyzer._state.exact)
        key = exact.settings.prompts[0]
        np.testing.assert_allclose(fast.patch_probabilities[key][rows], exact.patch_probabilities[key][rows],
                                   atol=1e-5)
    # tiny-random (16 px, random weights) is the hardest case for z-interpolation: 14-16 of 16 per seed
    assert np.mean(kept) >= 15 and min(kept) >= 14, kept


def test_fp32_fast_then_exact_reuses_the_exact_rows(monkeypatch, thin_scan, tiny_model, tmp_path):
    monkeypatch.setenv(proposals.CPU_BF16_ENV, "0")
    fast = Analyzer(tiny_settings(**FAST), model=tiny_model, cache=EmbeddingCache(tmp_path))
    r_fast = fast.analyze(thin_scan)
    exact = Analyzer(tiny_settings(slice_step_mm=1.0, top_k=16), model=tiny_model, cache=EmbeddingCache(tmp_path))
    r_exact = exact.analyze(thin_scan)
    assert exact.encoder.images_encoded == len(r_exact.patches) - r_fast.encoded_exactly + 1


def test_fp32_skip_distance_is_its_own_setting(monkeypatch, thin_scan, tiny_model):
    # The fp32 search's first pass follows fp32_skip_within_mm, not the bf16 pass's distance (7 mm
    # here): a shorter distance encodes more slices first; 0 encodes every slice, i.e. exact mode.
    monkeypatch.setenv(proposals.CPU_BF16_ENV, "0")
    runs = {}
    for skip_mm in (4.0, 2.0, 0.0):
        settings = tiny_settings(**FAST, fp32_skip_within_mm=skip_mm, proposal_skip_within_mm=7.0)
        r = Analyzer(settings, model=tiny_model).analyze(thin_scan)
        runs[skip_mm] = r.encoded_exactly
        note = next(x for x in r.notes if x.startswith("fast mode"))
        want = {4.0: "9 candidate slices apart", 2.0: "5 candidate slices apart", 0.0: "skip distance is 0 mm"}[skip_mm]
        assert want in note, (skip_mm, note)
    assert runs[4.0] < runs[2.0] < runs[0.0] == len(r.patches)
    with pytest.raises(InputError, match="fp32 skip distance"):
        tiny_settings(fp32_skip_within_mm=-1.0).validate()


def test_fp32_fast_mode_on_thick_slices_encodes_exactly(monkeypatch, small_scan, tiny_model):
    # 5 mm slices: nothing to skip, so an fp32 proposal pass would only repeat the exact one.
    monkeypatch.setenv(proposals.CPU_BF16_ENV, "0")
    analyzer = Analyzer(tiny_settings(scoring_mode="fast", rescore_min=16), model=tiny_model)
    r = analyzer.analyze(small_scan)
    assert r.encoded_exactly == len(r.patches)
    assert any("too few to skip" in note for note in r.notes)
    assert analyzer.encoder.images_encoded == len(r.patches) + 1


def test_fp32_exact_reprompt_matches_a_fresh_analysis(monkeypatch, thin_scan, tiny_model):
    monkeypatch.setenv(proposals.CPU_BF16_ENV, "0")
    analyzer = Analyzer(tiny_settings(prompts=["interstitial lung disease"], **FAST), model=tiny_model)
    first = analyzer.analyze(thin_scan)
    before = analyzer.encoder.images_encoded
    final = analyzer.reprompt(["emphysema"], exact=True)
    assert analyzer.encoder.images_encoded > before + 1  # the new prompt's best were searched and encoded
    assert final.encoded_exactly > first.encoded_exactly
    assert not any("proposal-pass scores" in n for n in final.notes)
    fresh = Analyzer(tiny_settings(prompts=["emphysema"], **FAST), model=tiny_model,
                     cache=EmbeddingCache()).analyze(thin_scan)
    assert len(set(final.ranked[:16].tolist()) & set(fresh.ranked[:16].tolist())) >= 15
    for k, p in fresh.finding_probabilities.items():
        assert abs(final.finding_probabilities[k] - p) <= 0.005
