"""Pattern map (issue 14): one label per patch from several prompts, painted volume, colour table, CLI outputs."""
import json

import numpy as np
import pytest

from conftest import tiny_settings
from test_outputs_safety import validate_result
from ZeroShotILDLib import patterns as pm
from ZeroShotILDLib.cli import main
from ZeroShotILDLib.results import PatchSet

FAST = ["--model", "tiny-random", "--device", "cpu", "--patch-mm", "30", "--slice-step-mm", "5", "-q"]


def test_labels_compare_patterns_in_their_own_normal_reference():
    """Each pattern judged against its own normal-lung reference; a box positive for several takes the one that
    stands highest above its reference, not the one with the largest raw contrast."""
    from ZeroShotILDLib import calibration

    rng = np.random.default_rng(0)
    n = 400
    normal = {"a": 0.15 + 0.01 * rng.standard_normal((4, n)), "b": -0.05 + 0.02 * rng.standard_normal((4, n))}
    refs = {k: calibration.build_reference(list(v)) for k, v in normal.items()}
    scores = {"a": 0.15 + 0.01 * rng.standard_normal(n), "b": -0.05 + 0.02 * rng.standard_normal(n)}
    scores["a"][5] += 0.08   # 8 of a's SDs
    scores["b"][6] += 0.16   # 8 of b's SDs, though its raw contrast stays below a's background
    scores["a"][7] += 0.05   # 5 SDs for a ...
    scores["b"][7] += 0.16   # ... and 8 for b: b wins
    from ZeroShotILDLib.extent import positive_patches

    positives = {k: positive_patches(scores[k], 3.0, refs[k]) for k in scores}
    pmap = pm.pattern_map_from_positives(["a", "b"], "normal lung", scores, refs, positives)
    assert pmap.labels[5] == 1 and pmap.labels[6] == 2 and pmap.labels[7] == 2
    assert scores["b"][6] < scores["a"][6]  # raw contrast would have called it a
    assert np.mean(pmap.labels != 0) < 0.03  # the background stays unlabelled
    assert pmap.scores.shape == (n, 2)


def test_paint_labels_and_colour_table():
    patches = PatchSet(np.array([2, 2, 6]), np.array([0, 4, 0]), np.array([0, 4, 4]), 4, 4, np.ones(3),
                       np.zeros((3, 3)))
    lung = np.ones((10, 8, 8), bool)
    lung[:, 0, 0] = False
    vol = pm.paint_labels(patches, np.array([1, 3, 2], np.uint8), lung.shape, slab_voxels=3, lung_mask=lung)
    assert vol.dtype == np.uint8
    assert vol[1, 1, 1] == 1 and vol[3, 5, 5] == 3 and vol[7, 1, 5] == 2 and vol[4, 1, 1] == 0
    assert vol[2, 0, 0] == 0  # outside the lungs
    text = pm.colour_table_text(["honeycombing", "ground-glass opacity"], pm.colours_for(["honeycombing", "x"]))
    lines = [ln.split() for ln in text.splitlines() if not ln.startswith("#")]
    assert lines[0][:2] == ["0", "none"] and lines[2][1] == "ground-glass_opacity"
    assert all(len(ln) == 6 and all(v.isdigit() for v in ln[2:]) for ln in lines)


def test_colours_are_distinct_for_unknown_prompts():
    cols = pm.colours_for(["a", "b", "honeycombing", "c"])
    assert len(set(cols)) == 4 and cols[2] == pm.COLOURS["honeycombing"]


@pytest.fixture(scope="module")
def analyzed(small_scan, tiny_model):
    from ZeroShotILDLib.pipeline import Analyzer

    analyzer = Analyzer(tiny_settings(), model=tiny_model)
    return analyzer, analyzer.analyze(small_scan)


def test_analyzer_labels_every_candidate(analyzed):
    _, result = analyzed
    pmap = result.patterns
    assert pmap.names == list(pm.DEFAULT_PATTERNS) and pmap.normal_prompt == "normal lung"
    assert pmap.labels.shape == (len(result.patches),) and pmap.labels.max() <= len(pmap.names)
    for k, name in enumerate(pmap.names, start=1):
        # Painted with its pattern only where it stands highest; its extent counts all its positive boxes.
        assert pmap.extent[name]["positive_patches"] >= int(np.count_nonzero(pmap.labels == k))
        assert 0.0 <= pmap.extent[name]["lung_fraction"] <= 1.0


def test_a_typed_prompt_and_a_pattern_of_the_same_name_give_the_same_extent(analyzed):
    """One word, one number: the prompt 'honeycombing' and the pattern 'honeycombing' share the rule."""
    analyzer, _ = analyzed
    result = analyzer.reprompt(prompts=["honeycombing", "interstitial lung disease"])
    typed, pattern = result.extent["honeycombing"], result.patterns.extent["honeycombing"]
    assert typed["lung_fraction"] == pattern["lung_fraction"] and typed["by_zone"] == pattern["by_zone"]
    assert typed["predominance"] == pattern["predominance"] and typed["rule"] == pattern["rule"]


def test_pattern_map_reuses_the_kept_embeddings(analyzed, monkeypatch):
    """Changing the pattern prompts encodes text only: no patch is encoded again."""
    analyzer, first = analyzed

    def no_images(*a, **k):
        raise AssertionError("patches were encoded again")

    monkeypatch.setattr(analyzer.encoder, "encode_batches", no_images)  # patches; the montage uses encode()
    again = analyzer.reprompt(patterns=["honeycombing", "emphysema", "mosaic attenuation"])
    assert again.patterns.names == ["honeycombing", "emphysema", "mosaic attenuation"]
    assert again.patterns.labels.shape == first.patterns.labels.shape
    off = analyzer.reprompt(patterns=[])
    assert off.patterns is None and off.extent  # extent per prompt stays


def test_cli_writes_patterns_and_removes_them_when_off(tmp_path, small_phantom, capsys):
    import SimpleITK as sitk

    scan = tmp_path / "phantom.nii.gz"
    small_phantom.save(scan)
    out = tmp_path / "out"
    assert main(["analyze", str(scan), "-o", str(out), *FAST, "--patterns", "honeycombing,emphysema"]) == 0
    doc = validate_result(out / "result.json")
    assert [lab["name"] for lab in doc["patterns"]["labels"]] == ["none", "honeycombing", "emphysema"]
    img = sitk.ReadImage(str(out / "patterns.nii.gz"))
    ref = sitk.ReadImage(str(scan))
    assert img.GetSize() == ref.GetSize() and np.allclose(img.GetDirection(), ref.GetDirection())
    labels = sitk.GetArrayFromImage(img)
    assert labels.max() <= 2
    painted = {int(v) for v in np.unique(labels)} - {0}
    assert painted <= {lab["value"] for lab in doc["patterns"]["labels"] if lab["patches"] > 0}
    assert "honeycombing" in (out / "patterns.ctbl").read_text(encoding="utf-8")
    manifest = json.loads((out / ".zeroshot-ild-manifest.json").read_text(encoding="utf-8"))
    assert {"patterns.nii.gz", "patterns.ctbl"} <= set(manifest["files"])
    assert main(["analyze", str(scan), "-o", str(out), *FAST, "--patterns", "off"]) == 0
    doc = validate_result(out / "result.json")
    assert doc["patterns"] is None and not (out / "patterns.nii.gz").exists() and not (out / "patterns.ctbl").exists()
    assert doc["extent"]["interstitial lung disease"]["rule"]


def test_settings_refuse_bad_extent_options(capsys):
    from ZeroShotILDLib.errors import InputError

    with pytest.raises(InputError, match="subpleural"):
        tiny_settings(subpleural_mm=0).validate()
    with pytest.raises(InputError, match="normal-lung prompt"):
        tiny_settings(normal_prompt=" ").validate()
    assert tiny_settings(patterns=[" a ", "a", ""]).validate().patterns == ["a"]


def test_painted_volume_and_extent_agree(analyzed):
    """patterns.nii.gz and the extent per pattern count the same voxels (same boxes, slabs and overlap rule)."""
    import dataclasses

    analyzer, result = analyzed
    n = len(result.patches)
    labels = (np.arange(n) % 3).astype(np.uint8)  # every label present
    pmap = dataclasses.replace(result.patterns, labels=labels)
    volume = pm.label_volume(dataclasses.replace(result, patterns=pmap))
    table = analyzer._state.zone_table
    voxel_ml = float(np.prod(result.spacing_mm)) / 1000.0
    for k in (1, 2):
        assert np.count_nonzero(volume == k) * voxel_ml == pytest.approx(table[:-1][labels == k].sum(), rel=1e-9)
    assert not volume[~result.lung_mask].any()


def test_a_model_trained_on_some_findings_maps_only_those(analyzed, monkeypatch):
    """phantom-demo was trained to name three patterns; "emphysema" from it is noise (it painted a fibrotic
    phantom's bases as emphysema), so the map leaves it out with a note. A typed prompt still gets its number."""
    import dataclasses

    analyzer, _ = analyzed
    model = analyzer.model
    monkeypatch.setattr(model, "spec", dataclasses.replace(model.spec, named_findings=("honeycombing",)))
    result = analyzer.reprompt(prompts=["emphysema"], patterns=["honeycombing", "emphysema"])
    assert result.patterns.names == ["honeycombing"] and list(result.patterns.extent) == ["honeycombing"]
    assert any("without 'emphysema'" in n and "not trained to name" in n for n in result.notes)
    assert 0.0 <= result.extent["emphysema"]["lung_fraction"] <= 1.0
    monkeypatch.setattr(model, "spec", dataclasses.replace(model.spec, named_findings=()))
    assert analyzer.reprompt(patterns=["honeycombing", "emphysema"]).patterns.names == ["honeycombing", "emphysema"]
