"""Issue 20: the normal-lung reference (calibrate command, provenance, the uncalibrated path), coverage of every
lung voxel, and "meaningful" decided from evidence (voxels, checkpoint health), not from file names."""
import json
import shutil

import numpy as np
import pytest

from conftest import REPO, shared_data, tiny_settings
from test_outputs_safety import validate_result
from ZeroShotILDLib import calibration
from ZeroShotILDLib.cli import main
from ZeroShotILDLib.phantom_signature import carries_signature, stamp
from ZeroShotILDLib.results import model_warning

DEMO_WEIGHTS = REPO / "ZeroShotILDLib" / "weights" / "phantom_demo.safetensors"
SMALL = ["--patch-mm", "30", "--slice-step-mm", "5", "--subtypes", "", "-q"]


@pytest.fixture(scope="module")
def normal_phantom_files(tmp_path_factory):
    from ZeroShotILDLib.phantom import generate_phantom

    folder = tmp_path_factory.mktemp("normals")
    paths = []
    for seed in (101, 102):
        path = folder / f"scan_{seed}.nii.gz"
        generate_phantom(seed, shape_zyx=(40, 112, 112), spacing_mm=(2.5, 2.5, 3.0), ild=False).save(path)
        paths.append(str(path))
    return paths


def test_calibrate_writes_the_reference_beside_the_weights_and_analyze_uses_it(tmp_path, normal_phantom_files,
                                                                               capsys):
    """The researcher's path: copy of the demo weights -> calibrate on normal scans -> calibrated extent, with the
    reference's provenance (scans, weights SHA-256) repeated in result.json."""
    from ZeroShotILDLib.file_hashes import sha256_file

    weights = tmp_path / "model" / "demo.safetensors"
    weights.parent.mkdir()
    shutil.copyfile(DEMO_WEIGHTS, weights)
    model = ["--model", f"dapt:{weights}", "--mode", "exact", *SMALL]
    out = tmp_path / "before"
    assert main(["analyze", normal_phantom_files[0], "-o", str(out), *model, "--patterns", "off"]) == 0
    before = validate_result(out / "result.json")["extent"]["interstitial lung disease"]
    assert before["calibrated"] is False and "UNCALIBRATED" in before["rule"]
    capsys.readouterr()
    assert main(["calibrate", *normal_phantom_files, *model, "--patterns", "honeycombing"]) == 0
    printed = capsys.readouterr().out
    assert "interstitial lung disease: normal median" in printed and "honeycombing" in printed
    doc = json.loads(calibration.reference_path(weights).read_text(encoding="utf-8"))
    assert doc["weights_sha256"] == sha256_file(weights) and doc["normal_prompt"] == "normal lung"
    assert set(doc["prompts"]) == {"interstitial lung disease", "honeycombing"}
    assert doc["prompts"]["honeycombing"]["scans"] == 2 and doc["prompts"]["honeycombing"]["bins"]
    out = tmp_path / "after"
    assert main(["analyze", normal_phantom_files[1], "-o", str(out), *model, "--patterns", "honeycombing"]) == 0
    result = validate_result(out / "result.json")
    after = result["extent"]["interstitial lung disease"]
    assert after["calibrated"] is True and after["reference"]["scans"] == 2
    assert after["reference"]["weights_sha256"] == sha256_file(weights)
    assert "robust standard deviations" in after["rule"]
    assert result["patterns"]["extent"]["honeycombing"]["calibrated"] is True
    assert not any("uncalibrated" in n for n in result["notes"])
    # Other weights under the same name: the reference is not theirs and is ignored, with a note.
    with open(weights, "r+b") as handle:
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    out = tmp_path / "changed"
    assert main(["analyze", normal_phantom_files[1], "-o", str(out), *model, "--patterns", "off"]) == 0
    result = validate_result(out / "result.json")
    assert result["extent"]["interstitial lung disease"]["calibrated"] is False
    assert any("made for other weights" in n for n in result["notes"])


def test_calibrate_refuses_random_weights_in_one_line(normal_phantom_files, capsys):
    assert main(["calibrate", normal_phantom_files[0], "--model", "tiny-random", *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no weights file" in err


def test_the_shipped_demo_reference_matches_the_shipped_weights():
    from ZeroShotILDLib.file_hashes import sha256_file

    refs, note = calibration.load_references(DEMO_WEIGHTS, sha256_file(DEMO_WEIGHTS),
                                             ["interstitial lung disease", "honeycombing", "reticulation",
                                              "ground-glass opacity"], "normal lung")
    assert not note and all(r is not None and r["scans"] >= 10 for r in refs.values()), refs


def test_reference_bins_compare_boxes_with_like_lung_fractions():
    """Pleural boxes (little lung, much chest wall) are judged against normal pleural boxes, not whole-lung ones."""
    rng = np.random.default_rng(1)
    fractions = [rng.uniform(0.05, 1.0, 3000) for _ in range(3)]
    # Normal pleural boxes score 0.2 higher than central ones.
    scores = [np.where(f < 0.25, 0.15, -0.05) + 0.02 * rng.standard_normal(f.size) for f in fractions]
    ref = calibration.build_reference(scores, fractions)
    assert len(ref["bins"]) == 4
    from ZeroShotILDLib import extent as ex

    f = rng.uniform(0.05, 1.0, 2000)
    normal = np.where(f < 0.25, 0.15, -0.05) + 0.02 * rng.standard_normal(f.size)
    assert ex.positive_patches(normal, 3.0, ref, f).mean() < 0.01
    assert ex.positive_patches(normal, 3.0, ref).mean() > 0.1  # pooled: every pleural box would count
    sick = normal + 0.15
    assert ex.positive_patches(sick, 3.0, ref, f).mean() > 0.95


def test_every_lung_voxel_is_scored_on_phantoms(small_phantom, tiny_model):
    """Boxes reaching the pleura take part: >= 98 % of the lung and >= 95 % of the 10 mm rind lie in a scored box,
    while the montage and top patches still come from boxes passing the lung-fraction filter."""
    from ZeroShotILDLib.pipeline import Analyzer
    from ZeroShotILDLib.scan import scan_from_array

    ph = small_phantom
    scan = scan_from_array(ph.hu, ph.spacing_mm, ph.origin_mm, ph.direction, source="x")
    settings = tiny_settings(patch_mm=32.0, slice_step_mm=5.0, patterns=[], subtypes=[])
    result = Analyzer(settings, model=tiny_model).analyze(scan, lung_mask=ph.lung_mask)
    assert result.zones["scored_share"] >= 0.98 and result.zones["scored_share_by_zone"]["subpleural"] >= 0.95
    eligible = result.patches.lung_fraction >= settings.filter_threshold
    assert (~eligible).sum() > 0.2 * len(result.patches)  # the pleural boxes are there ...
    assert eligible[result.ranked].all() and eligible[result.montage_indices].all()  # ... but never shown as top


def test_every_lung_voxel_is_scored_on_the_real_ipf_series():
    """The real IPF HRCT (interval series, fibrosis at the bases): the pleura is looked at."""
    from ZeroShotILDLib import extent as ex
    from ZeroShotILDLib import lung_mask
    from ZeroShotILDLib.patches import scored_patches, slice_step_voxels
    from ZeroShotILDLib.scan import read_scan
    from ZeroShotILDLib.settings import AnalysisSettings

    scan = read_scan(str(shared_data("real", "ct", "osic_ipf_sparse")))
    settings = AnalysisSettings()
    mask = lung_mask.segment_lungs(scan.hu, scan.spacing_mm, settings.lung, direction=scan.direction)
    zones = ex.lung_zones(mask, scan.spacing_mm, scan.origin_mm, scan.direction, scan.slice_positions_mm, 10.0)
    patches = scored_patches(mask, scan.spacing_mm, settings, scan.origin_mm, scan.direction, scan.slice_positions_mm)
    table = ex.zone_volume_table(zones.codes, patches, scan.spacing_mm,
                                 slice_step_voxels(scan.spacing_mm, settings.slice_step_mm), scan.slab_mm)
    share, by_zone = ex.scored_share(table)
    assert share >= 0.98 and by_zone["subpleural"] >= 0.95


# ----------------------------------------------------------------------------------------------
# "Meaningful" from evidence
# ----------------------------------------------------------------------------------------------
def test_phantom_signature_is_read_from_the_voxels():
    hu = np.full((6, 40, 64), -1000, dtype=np.int16)
    assert not carries_signature(hu)
    stamped = stamp(hu.copy())
    assert carries_signature(stamped)
    assert carries_signature(stamped[:, ::-1, ::-1])  # stored the other way round
    stamped[:4, 1, 30] += 1  # most slices damaged (resampled, edited): no longer a phantom
    assert not carries_signature(stamped)


def test_warning_follows_evidence_not_names():
    assert "phantoms only" in model_warning("phantom-demo", random_weights=False, trained_on="phantoms",
                                            is_phantom=False)
    assert model_warning("phantom-demo", random_weights=False, trained_on="phantoms", is_phantom=True) == ""
    assert "random weights" in model_warning("tiny-random", random_weights=True, trained_on="", is_phantom=True)
    for health, why in (({"collapsed": True, "at_chance": False}, "collapsed"),
                        ({"collapsed": False, "at_chance": True}, "chance")):
        assert why in model_warning("dapt:x", random_weights=False, trained_on="", is_phantom=False,
                                    training_health=health)
    assert model_warning("dapt:x", random_weights=False, trained_on="", is_phantom=False,
                         training_health={"collapsed": False, "at_chance": False}) == ""


def test_a_real_ct_renamed_phantom_stays_flagged_and_a_renamed_phantom_does_not(tmp_path, small_phantom):
    """A real CT copied to phantom_patient42.nii.gz keeps its not-meaningful banner with the phantom model."""
    import SimpleITK as sitk

    real = sitk.ReadImage(str(shared_data("real", "ct", "totalseg", "chest_crop_a.nii.gz")))
    renamed = tmp_path / "phantom_patient42.nii.gz"
    sitk.WriteImage(real[:, :, 30:80], str(renamed))
    out = tmp_path / "real"
    args = ["--model", "phantom-demo", *SMALL, "--patterns", "off", "--mode", "exact"]
    assert main(["analyze", str(renamed), "-o", str(out), *args]) == 0
    doc = validate_result(out / "result.json")
    assert doc["model"]["meaningful"] is False
    assert "NOT meaningful" in (out / "report.html").read_text(encoding="utf-8")
    # A phantom saved under a real-sounding name is still a phantom.
    disguised = tmp_path / "CT_chest_2024.nii.gz"
    small_phantom.save(disguised)
    out = tmp_path / "phantom"
    assert main(["analyze", str(disguised), "-o", str(out), *args]) == 0
    assert validate_result(out / "result.json")["model"]["meaningful"] is True


def test_a_collapsed_dapt_checkpoint_is_flagged(tmp_path, small_scan, tiny_model):
    """The health verdict DAPT writes into the checkpoint decides; a healthy one is not flagged."""
    from ZeroShotILDLib import models
    from ZeroShotILDLib.pipeline import Analyzer

    spec = tiny_model.spec
    for name, health, flagged in (("bad", {"collapsed": True, "at_chance": False}, True),
                                  ("good", {"collapsed": False, "at_chance": False}, False)):
        path = models.save_checkpoint(tmp_path / f"{name}.safetensors", tiny_model.model, spec,
                                      extra={"training": {"health": health, "domain": "ct"}})
        settings = tiny_settings(model=f"dapt:{path}", patterns=[], subtypes=[])
        result = Analyzer(settings).analyze(small_scan)
        assert result.model_meaningful is (not flagged), name
        assert ("did not learn" in result.model_warning) is flagged
