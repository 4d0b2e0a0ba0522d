"""Fast scoring mode (issue 5): proposal pass + exact re-scoring, measured against the exact mode."""
import dataclasses

import numpy as np
import pytest
import torch

from conftest import tiny_settings
from ZeroShotILDLib import proposals
from ZeroShotILDLib.embeddings import EmbeddingCache
from ZeroShotILDLib.errors import InputError
from ZeroShotILDLib.patches import patch_pixels
from ZeroShotILDLib.pipeline import Analyzer
from ZeroShotILDLib.settings import AnalysisSettings

# Small ILD phantoms: enough candidates (~350) that the proposal pass pays off for the tiny model.
FIDELITY_SEEDS = (3, 4)
FAST = dict(scoring_mode="fast", rescore_fraction=0.1, rescore_min=16)
needs_bf16 = pytest.mark.skipif(not proposals.cpu_has_fast_bf16(),
                                reason="the bf16 proposal pass needs a CPU with AMX or AVX512-BF16")


def _scan(seed):
    from ZeroShotILDLib.phantom import generate_phantom
    from ZeroShotILDLib.scan import scan_from_array

    p = generate_phantom(seed, shape_zyx=(40, 128, 128), spacing_mm=(2.5, 2.5, 5.0), ild=True)
    return scan_from_array(p.hu, p.spacing_mm, p.origin_mm, p.direction, source=f"phantom {seed}")


@pytest.fixture(scope="module")
def runs(tiny_model):
    out = []
    for seed in FIDELITY_SEEDS:
        scan = _scan(seed)
        exact = Analyzer(tiny_settings(patch_mm=30.0), model=tiny_model).analyze(scan)
        fast_analyzer = Analyzer(tiny_settings(patch_mm=30.0, **FAST), model=tiny_model)
        fast = fast_analyzer.analyze(scan)
        out.append((scan, exact, fast_analyzer, fast))
    return out


@needs_bf16
def test_fast_mode_keeps_the_exact_top_patches(runs):
    kept, rescored_share = [], []
    for _, exact, analyzer, fast in runs:
        n = len(exact.patches)
        assert len(fast.patches) == n
        # Fewer full-resolution encodings than candidates: the two-stage path really ran.
        assert fast.encoded_exactly < n and exact.encoded_exactly == n
        top_exact = set(exact.ranked[:16].tolist())
        rescored = set(np.flatnonzero(analyzer._state.exact).tolist())
        kept.append(len(top_exact & set(fast.ranked[:16].tolist())) / 16)
        rescored_share.append(len(top_exact & rescored) / 16)
        for k, p in exact.finding_probabilities.items():
            assert abs(fast.finding_probabilities[k] - p) <= 0.01
        for k, p in exact.subtype_probabilities.items():
            assert abs(fast.subtype_probabilities[k] - p) <= 0.01
        # Re-scored patches carry exactly the exact mode's probabilities.
        idx = sorted(rescored)
        np.testing.assert_allclose(fast.patch_probabilities["interstitial lung disease"][idx],
                                   exact.patch_probabilities["interstitial lung disease"][idx], atol=1e-5)
    assert np.mean(kept) >= 0.95 and np.mean(rescored_share) >= 0.95


@needs_bf16
def test_fast_ranking_puts_exact_scores_first(runs):
    _, _, analyzer, fast = runs[0]
    exact_rows = analyzer._state.exact
    assert exact_rows[fast.ranked].all() and exact_rows[fast.montage_indices].all()
    p = fast.patch_probabilities["interstitial lung disease"]
    assert np.all(np.diff(p[fast.ranked]) <= 0)
    assert any("fast mode" in note for note in fast.notes)


@needs_bf16
def test_fast_reprompt_encodes_no_patch(runs):
    _, _, analyzer, first = runs[1]
    before = analyzer.encoder.images_encoded
    r = analyzer.reprompt(["honeycombing"], subtypes=["sarcoidosis"])
    assert analyzer.encoder.images_encoded - before == 1  # the new montage only
    assert r.encoded_exactly == first.encoded_exactly
    assert list(r.finding_probabilities) == ["honeycombing"]
    assert any("proposal-pass scores" in note for note in r.notes)
    back = analyzer.reprompt(["interstitial lung disease"], subtypes=list(first.subtype_probabilities))
    np.testing.assert_array_equal(back.ranked, first.ranked)
    assert back.finding_probabilities == pytest.approx(first.finding_probabilities)


@needs_bf16
def test_cache_is_shared_between_modes(tiny_model, tmp_path):
    scan = _scan(FIDELITY_SEEDS[0])
    fast = Analyzer(tiny_settings(patch_mm=30.0, **FAST), model=tiny_model, cache=EmbeddingCache(tmp_path))
    r_fast = fast.analyze(scan)
    exact = Analyzer(tiny_settings(patch_mm=30.0), model=tiny_model, cache=EmbeddingCache(tmp_path))
    r_exact = exact.analyze(scan)
    # The exact run only encodes the rows fast mode left at proposal resolution, plus its montage.
    assert exact.encoder.images_encoded == len(r_exact.patches) - r_fast.encoded_exactly + 1
    again = Analyzer(tiny_settings(patch_mm=30.0, **FAST), model=tiny_model, cache=EmbeddingCache(tmp_path))
    r_again = again.analyze(scan)
    assert again.encoder.images_encoded == 1  # everything is exact in the cache now
    assert again._fast_model is None  # so no proposal pass was even prepared
    assert r_again.encoded_exactly == len(r_again.patches)
    assert any("reused from the cache" in note for note in r_again.notes)


def test_small_scans_are_encoded_exactly_in_fast_mode(small_scan, tiny_model):
    # With rescore_min above the candidate count the proposal pass cannot pay off.
    r = Analyzer(tiny_settings(scoring_mode="fast", rescore_min=10_000), model=tiny_model).analyze(small_scan)
    assert r.encoded_exactly == len(r.patches)
    assert not any("proposal pass" in note for note in r.notes)


def test_low_resolution_swaps_and_restores_position_embeddings(tiny_model):
    visual = tiny_model.model.visual
    original = visual.positional_embedding
    assert proposals.full_grid_tokens(tiny_model) == 4
    with proposals.low_resolution(tiny_model, 1) as size:
        assert size == 16 and visual.positional_embedding.shape == (2, original.shape[1])
        feats = tiny_model.model.encode_image(torch.rand(2, 3, size, size))
        assert feats.shape == (2, 64)
    assert visual.positional_embedding is original
    with pytest.raises(RuntimeError, match="boom"):
        with proposals.low_resolution(tiny_model, 2):
            raise RuntimeError("boom")
    assert visual.positional_embedding is original
    same = proposals.resize_position_embedding(original.detach(), 4)
    torch.testing.assert_close(same, original.detach())


def test_rescore_count_and_ranking_helpers():
    assert proposals.rescore_count(1000, top_k=16, montage_patches=16, rescore_fraction=0.05, rescore_min=64) == 64
    assert proposals.rescore_count(5000, top_k=16, montage_patches=16, rescore_fraction=0.05, rescore_min=64) == 250
    assert proposals.rescore_count(10, top_k=16, montage_patches=16, rescore_fraction=0.05, rescore_min=64) == 10
    assert proposals.proposals_pay_off(1000, 64, 7, 7)  # full-resolution bf16 pass + 64 exact
    assert not proposals.proposals_pay_off(100, 70, 7, 7)
    assert proposals.proposals_pay_off(100, 95, 1, 7, relative_cost=1.0)  # 2 tokens against 50
    p = np.array([0.9, 0.8, 0.95, 0.7])
    exact = np.array([False, True, False, True])
    np.testing.assert_array_equal(proposals.rank_exact_first(p, exact, 3), [1, 3, 2])
    np.testing.assert_array_equal(proposals.select_for_rescoring(p, 2), [2, 0])
    np.testing.assert_array_equal(proposals.select_for_rescoring(p, 3, already_exact=exact), [2, 0])


def test_patch_pixels_from_a_tensor_volume_match_numpy(small_scan):
    from ZeroShotILDLib.lung_mask import segment_lungs
    from ZeroShotILDLib.patches import candidates_for

    s = tiny_settings()
    mask = segment_lungs(small_scan.hu, small_scan.spacing_mm, s.lung)
    patches = candidates_for(mask, small_scan.spacing_mm, s)
    idx = np.arange(0, len(patches), 3)[::-1]  # out of slice order on purpose
    a = patch_pixels(small_scan.hu, patches, idx, image_size=64)
    b = patch_pixels(torch.from_numpy(small_scan.hu), patches, idx, image_size=64)
    torch.testing.assert_close(a, b)
    # Row k is the k-th requested patch: compare one against a direct crop.
    k = 1
    z, r, c = patches.slice_index[idx[k]], patches.row0[idx[k]], patches.col0[idx[k]]
    crop = small_scan.hu[z, r:r + patches.size_rows, c:c + patches.size_cols].astype(np.float32)
    lo, hi = s.hu_window
    expected = torch.from_numpy(np.clip((crop - lo) / (hi - lo), 0, 1))[None, None]
    expected = torch.nn.functional.interpolate(expected, size=(64, 64), mode="bicubic", align_corners=False,
                                               antialias=patches.size_rows > 64).clamp(0, 1)
    torch.testing.assert_close(a[k:k + 1], expected, atol=1e-5, rtol=1e-5)


def test_settings_round_trip_and_validation():
    s = AnalysisSettings(scoring_mode="fast", proposal_grid_tokens=2, rescore_fraction=0.1, rescore_min=32)
    assert AnalysisSettings().proposal_grid_tokens == 0  # full resolution: lower grids lost fidelity
    back = AnalysisSettings.from_dict(s.to_dict())
    assert back == s and back.validate().scoring_mode == "fast"
    for bad, match in ((dict(proposal_grid_tokens=-1), "proposal grid"), (dict(rescore_fraction=1.5), "re-score fraction"),
                       (dict(rescore_min=-1), "re-score minimum"), (dict(scoring_mode="quick"), "scoring mode")):
        with pytest.raises(InputError, match=match):
            dataclasses.replace(s, **bad).validate()


@needs_bf16
def test_reprompt_refuses_fast_mode_changes(runs):
    _, _, analyzer, _ = runs[0]
    with pytest.raises(InputError, match="analyze"):
        analyzer.reprompt(rescore_fraction=0.5)


# ----------------------------------------------------------------------------------------------
# Coarse-to-fine in z (proposal_skip_within_mm)
# ----------------------------------------------------------------------------------------------
def test_slice_neighbours_first_pass_refine_and_interpolation():
    # One box column (row 0) on slices 0..4, and a box (row 10) that exists on slice 1 only.
    z = np.array([0, 1, 2, 3, 4, 1])
    r = np.array([0, 0, 0, 0, 0, 10])
    c = np.zeros(6, dtype=np.int64)
    assert proposals.proposal_slice_step(1.0, 1.0) == 3  # slices 1 and 2 lie 1 mm from 0 or 3
    assert proposals.proposal_slice_step(0.5, 1.0) == 5 and proposals.proposal_slice_step(0.625, 1.0) == 3
    assert proposals.proposal_slice_step(1.5, 1.0) == 1 and proposals.proposal_slice_step(1.0, 0.0) == 1
    assert proposals.proposal_slice_step(1.0000001, 1.0) == 3  # a header's float-rounded 1 mm
    # Candidates on every other scan slice (stride 2): neighbours are 2 scan slices apart.
    z2, r2, c2 = np.array([0, 2, 4, 6]), np.zeros(4, np.int64), np.zeros(4, np.int64)
    nb2 = proposals.slice_neighbours(z2, r2, c2, 3, stride=2)
    np.testing.assert_array_equal(nb2[1], [0, 2, -1, 3])
    np.testing.assert_array_equal(proposals.first_pass(z2, nb2, 3, stride=2), [True, False, False, True])
    nb = proposals.slice_neighbours(z, r, c, 3)  # columns dz = -1, +1, -2, +2
    np.testing.assert_array_equal(nb[1], [0, 2, -1, 3])
    np.testing.assert_array_equal(nb[4], [3, -1, 2, -1])
    np.testing.assert_array_equal(nb[5], [-1, -1, -1, -1])
    first = proposals.first_pass(z, nb, 3)
    # Slices 0 and 3 are coarse; the lone box on slice 1 has nothing to interpolate from.
    np.testing.assert_array_equal(first, [True, False, False, True, False, True])
    assert proposals.first_pass(z, proposals.slice_neighbours(z, r, c, 1), 1).all()
    scores = np.array([0.1, 0.0, 0.0, 0.9, 0.0, 0.5])
    np.testing.assert_array_equal(proposals.neighbours_to_refine(scores, first, nb, 1), [1, 2, 4])
    assert proposals.neighbours_to_refine(scores, first, nb, 0).size == 0

    feats = np.zeros((6, 2), np.float32)
    feats[0], feats[3], feats[5] = [1, 0], [0, 1], [1, 1]
    out = proposals.interpolate_skipped(feats, first, z, nb)
    # Slice 1 lies 1 slice above slice 0 and 2 below slice 3: weights 1 and 1/2, then unit length.
    np.testing.assert_allclose(out[1], np.array([1, 0.5]) / np.hypot(1, 0.5), rtol=1e-6)
    np.testing.assert_allclose(out[2], np.array([0.5, 1]) / np.hypot(1, 0.5), rtol=1e-6)
    np.testing.assert_allclose(out[4], [0, 1])  # only a neighbour below
    np.testing.assert_array_equal(out[first], feats[first])  # encoded rows are left alone


def _thin_scan(seed):
    from ZeroShotILDLib.phantom import generate_phantom
    from ZeroShotILDLib.scan import scan_from_array

    p = generate_phantom(seed, shape_zyx=(48, 128, 128), spacing_mm=(2.5, 2.5, 1.0), ild=True)
    return scan_from_array(p.hu, p.spacing_mm, p.origin_mm, p.direction, source=f"thin phantom {seed}")


def _count_proposals(analyzer):
    """Wrap the analyzer's proposal encoder to count the candidates it encodes."""
    counted = []
    original = analyzer._encode_proposals

    def counting(fast_model, volume, patches, grid_tokens, indices, stage):
        counted.append(len(indices))
        return original(fast_model, volume, patches, grid_tokens, indices, stage)

    analyzer._encode_proposals = counting
    return counted


@needs_bf16
def test_slice_step_proposals_keep_the_exact_top_patches_on_thin_slices(tiny_model, tmp_path):
    scan = _thin_scan(5)
    base = dict(patch_mm=30.0, slice_step_mm=1.0, scoring_mode="fast", rescore_fraction=0.05, rescore_min=16)
    exact = Analyzer(tiny_settings(**{**base, "scoring_mode": "exact"}), model=tiny_model).analyze(scan)
    n = len(exact.patches)
    fast_analyzer = Analyzer(tiny_settings(**base, proposal_skip_within_mm=1.0), model=tiny_model,
                             cache=EmbeddingCache(tmp_path))
    counted = _count_proposals(fast_analyzer)
    fast = fast_analyzer.analyze(scan)
    # The first pass took every third slice, the second the neighbours of its best boxes, and
    # the rest were interpolated: fewer proposal encodings than candidates.
    assert len(counted) == 2 and sum(counted) < 0.7 * n
    assert any("interpolated" in note for note in fast.notes)
    rescored = set(np.flatnonzero(fast_analyzer._state.exact).tolist())
    top_exact = set(exact.ranked[:16].tolist())
    assert len(top_exact & rescored) / 16 >= 0.95
    assert len(top_exact & set(fast.ranked[:16].tolist())) / 16 >= 0.95
    for k, p in {**exact.finding_probabilities, **exact.subtype_probabilities}.items():
        assert abs({**fast.finding_probabilities, **fast.subtype_probabilities}[k] - p) <= 0.01

    # Another prompt on the same cache: only its own skipped neighbours are encoded, none again.
    other = Analyzer(tiny_settings(**base, proposal_skip_within_mm=1.0, prompts=["honeycombing"]),
                     model=tiny_model, cache=EmbeddingCache(tmp_path))
    counted_again = _count_proposals(other)
    other.analyze(scan)
    assert len(counted_again) <= 1 and sum(counted_again) <= counted[1]


@needs_bf16
def test_thick_slices_are_never_skipped(runs):
    # 5 mm slices: none lies within 1 mm of another, so nothing is skipped or interpolated.
    for _, _, _, fast in runs:
        assert not any("interpolated" in note for note in fast.notes)


def test_folding_quick_gelu_keeps_the_function():
    import copy

    from open_clip.transformer import QuickGELU

    mlp = torch.nn.Sequential()
    mlp.add_module("c_fc", torch.nn.Linear(8, 32))
    mlp.add_module("gelu", QuickGELU())
    mlp.add_module("c_proj", torch.nn.Linear(32, 8))
    block = torch.nn.Module()
    block.mlp = mlp
    tower = torch.nn.Sequential(block)
    before = copy.deepcopy(mlp)
    assert proposals.fold_quick_gelu(tower) == 1 and isinstance(mlp.gelu, torch.nn.SiLU)
    x = torch.randn(5, 8)
    torch.testing.assert_close(mlp(x), before(x), rtol=1e-5, atol=1e-6)
    assert proposals.fold_quick_gelu(tower) == 0  # already folded: nothing left to change
