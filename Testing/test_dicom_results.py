"""DICOM results (issue 14): lung mask and pattern map as DICOM SEG, probabilities and extent as a
TID 1500 SR, referencing the source series.

A phantom is written as a DICOM series (its own study, frame of reference and a patient name), run
through ``analyze``'s writer, and the objects are read back with pydicom and highdicom: segment
count, frames on the source slices' planes referencing those slices, pixels equal to the masks,
measurement values equal to the result, the source's patient and study carried over; and checked
with dciodvfy (dicom3tools) when installed. The real OSIC series in ../shared runs when present.
"""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared_data, tiny_settings
from ZeroShotILDLib import cli, dicom_results, outputs
from ZeroShotILDLib.phantom import generate_phantom
from ZeroShotILDLib.report import best_slices
from ZeroShotILDLib.report_pdf import PDF_NAME, pdf_engine_problem
from ZeroShotILDLib.scan import read_scan, scan_from_array

hd = pytest.importorskip("highdicom", reason="highdicom not installed (pip install 'zeroshot-ild[dicom]')")
pydicom = pytest.importorskip("pydicom")

STUDY_UID = "1.2.826.0.1.3680043.8.498.2001"
SERIES_UID = "1.2.826.0.1.3680043.8.498.2002"
FRAME_UID = "1.2.826.0.1.3680043.8.498.2003"
PATIENT = "Testpatient^Jane"
EXTENT = {"interstitial lung disease": {
    "lung_fraction": 0.23, "predominance": "lower, subpleural", "rule": "hand-made for the test",
    "by_zone": {"upper": 0.05, "middle": 0.2, "lower": 0.44, "left": 0.25, "right": 0.21, "subpleural": 0.35,
                "central": 0.1}}}
#: Extent of a prompt the run gave no probability for (a pattern prompt): its own group, extent only.
EXTENT_ONLY = {"honeycombing": {"lung_fraction": 0.07, "by_zone": {"lower": 0.15, "upper": None}, "rule": "hand-made"}}
PATTERN_NAMES = {1: "honeycombing", 2: "reticulation", 4: "normal lung"}  # label 3 unnamed, 4 after a gap


def write_ct_series(folder, scan, keep=None):
    """``scan``'s slices (or those in ``keep``) as a CT series: one study, series and frame of reference."""
    folder.mkdir(parents=True)
    keep = range(scan.hu.shape[0]) if keep is None else keep
    d = np.asarray(scan.direction).reshape(3, 3)
    orientation = "\\".join(f"{v:.6f}" for v in list(d[:, 0]) + list(d[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for n, k in enumerate(keep):
        image = sitk.GetImageFromArray(np.ascontiguousarray(scan.hu[k], dtype=np.int16))
        image.SetSpacing(tuple(float(v) for v in scan.spacing_mm[:2]))
        position = np.asarray(scan.origin_mm) + d[:, 2] * k * scan.spacing_mm[2]
        for key, value in {"0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0020|000d": STUDY_UID,
                           "0020|000e": SERIES_UID, "0020|0052": FRAME_UID, "0008|0018": f"{SERIES_UID}.{n + 1}",
                           "0020|0013": str(n + 1), "0010|0010": PATIENT, "0010|0020": "ZSILD-TEST-1",
                           "0020|0032": "\\".join(f"{v:.4f}" for v in position), "0020|0037": orientation,
                           "0018|0050": f"{scan.spacing_mm[2]:g}", "0028|1052": "-1024", "0028|1053": "1"}.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{n:04d}.dcm"))  # names in z order here; the reader sorts anyway
        writer.Execute(image)


@pytest.fixture(scope="module")
def phantom_scan():
    ph = generate_phantom(11, shape_zyx=(24, 96, 96), spacing_mm=(3.0, 3.0, 5.0),
                          subtype="idiopathic pulmonary fibrosis")
    return scan_from_array(ph.hu, ph.spacing_mm, ph.origin_mm, ph.direction, source="phantom")


def analysed_dicom(folder, tiny_model, *, with_patterns=True):
    """A DICOM series analysed with hand-made extent; the engine's own pattern map unless ``with_patterns`` is off."""
    from ZeroShotILDLib.pipeline import Analyzer

    scan = read_scan(folder)
    settings = tiny_settings(patch_mm=20.0) if with_patterns else tiny_settings(patch_mm=20.0, patterns=[])
    result = Analyzer(settings, model=tiny_model).analyze(scan)
    result.extent = {**EXTENT, **EXTENT_ONLY}
    if with_patterns:
        assert result.patterns is not None
        # Extent for two of the patterns only: the others get a segment but no SR group.
        zones = EXTENT["interstitial lung disease"]
        result.patterns.extent = {"honeycombing": {**zones, "lung_fraction": 0.3},
                                  "reticulation": {**zones, "lung_fraction": 0.2}}
    else:
        assert result.patterns is None
    return scan, result


@pytest.fixture(scope="module")
def written(tmp_path_factory, phantom_scan, tiny_model):
    root = tmp_path_factory.mktemp("dicom")
    write_ct_series(root / "series", phantom_scan)
    scan, result = analysed_dicom(root / "series", tiny_model)
    out = outputs.write_outputs(result, scan, root / "out")
    return scan, result, out


def sources_of(scan):
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in scan.dicom_files]


def check_segmentation_on_sources(seg, sources, masks_by_segment):
    """Frames lie on the source slices' planes and reference them; pixels equal the masks [z, y, x]."""
    by_uid = {d.SOPInstanceUID: (z, d) for z, d in enumerate(sources)}
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.PatientName == sources[0].PatientName and seg.PatientID == sources[0].PatientID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    frames_per_segment = {}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert uid in by_uid, "a frame references an instance outside the source series"
        z, source = by_uid[uid]
        np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in source.ImagePositionPatient], atol=1e-3)
        # One segment: DICOM may put its identification in the shared functional groups.
        holder = frame if "SegmentIdentificationSequence" in frame else seg.SharedFunctionalGroupsSequence[0]
        number = int(holder.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        frames_per_segment.setdefault(number, set()).add(z)
    for number, mask in masks_by_segment.items():
        # a frame for exactly the slices where the segment has voxels (empty frames are left out)
        assert frames_per_segment.get(number, set()) == set(np.flatnonzero(mask.reshape(mask.shape[0], -1).any(1)))
        pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[d.SOPInstanceUID for d in sources],
                                                   segment_numbers=[number])
        np.testing.assert_array_equal(pixels[..., 0] > 0, mask)


def test_lung_mask_seg_lies_on_the_source_slices(written):
    scan, result, out = written
    sources = sources_of(scan)
    seg = hd.seg.segread(out / "lung_mask.seg.dcm")
    assert seg.SegmentationType == "BINARY"
    assert len(seg.SegmentSequence) == 1
    segment = seg.get_segment_description(1)
    assert segment.segment_label == "Lungs" and segment.segmented_property_type.meaning == "Lung"
    check_segmentation_on_sources(seg, sources, {1: result.lung_mask})


def test_pattern_seg_has_a_segment_per_named_pattern(written):
    from ZeroShotILDLib.patterns import label_volume

    scan, result, out = written
    seg = hd.seg.segread(out / "patterns.seg.dcm")
    labels = [str(d.SegmentLabel) for d in seg.SegmentSequence]
    assert labels == list(result.patterns.names)
    volume = label_volume(result)
    masks = {number: volume == number for number in range(1, len(labels) + 1)}
    check_segmentation_on_sources(seg, sources_of(scan), masks)


def test_pattern_segments_are_numbered_without_gaps(written):
    from ZeroShotILDLib.dicom_results import pattern_segmentation

    scan, result, _ = written
    # Named labels in three bands of the lungs, an unnamed label 3 (written as none), label 4 after it.
    labels = np.zeros(scan.hu.shape, np.uint8)
    z = np.arange(scan.hu.shape[0])[:, None, None]
    labels[result.lung_mask & (z < 8)] = 1
    labels[result.lung_mask & (z >= 8) & (z < 12)] = 3
    labels[result.lung_mask & (z >= 12) & (z < 18)] = 2
    labels[result.lung_mask & (z >= 18)] = 4
    sources = sources_of(scan)
    seg = pattern_segmentation(labels, PATTERN_NAMES, sources)
    assert [str(d.SegmentLabel) for d in seg.SegmentSequence] == ["honeycombing", "reticulation", "normal lung"]
    masks = {number: labels == value for number, value in enumerate(sorted(PATTERN_NAMES), start=1)}
    check_segmentation_on_sources(seg, sources, masks)


def _numeric(group):
    return {m.name.meaning: (m.value, m.unit.value) for m in group.get_measurements()}


def test_sr_holds_probabilities_and_extent_and_references_the_segs(written):
    scan, result, out = written
    sources = sources_of(scan)
    seg = pydicom.dcmread(out / "lung_mask.seg.dcm", stop_before_pixels=True)
    patterns = pydicom.dcmread(out / "patterns.seg.dcm", stop_before_pixels=True)
    sr = hd.sr.srread(out / "result.sr.dcm")
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
    assert str(sr.ContentTemplateSequence[0].TemplateIdentifier) == "1500"
    assert sr.StudyInstanceUID == STUDY_UID and sr.PatientName == PATIENT
    report = sr.content
    groups = report.get_volumetric_roi_measurement_groups()
    # Each finding once: a pattern that is also a prompt is carried by the prompt's group (one rule, one number).
    prompts = set(result.finding_probabilities) | set(EXTENT_ONLY)
    expected = (len(result.finding_probabilities) + len(EXTENT_ONLY) + len(result.subtype_probabilities)
                + len([n for n in result.patterns.extent if n not in prompts]))
    assert len(groups) == expected
    by_id = {g.tracking_identifier: g for g in groups}
    assert not [n for n in prompts if f"pattern: {n}" in by_id]
    prompt = result.primary_prompt
    values = _numeric(by_id[f"prompt: {prompt}"])
    assert values["Zero-shot montage probability"][0] == pytest.approx(result.finding_probabilities[prompt], abs=1e-6)
    assert values["Extent, share of lung volume"] == (pytest.approx(23.0), "%")
    for zone, fraction in EXTENT[prompt]["by_zone"].items():
        assert values[f"Extent, share of {zone} zone lung volume"][0] == pytest.approx(100 * fraction)
    assert _numeric(by_id["prompt: honeycombing"]) == {
        "Extent, share of lung volume": (pytest.approx(7.0), "%"),
        "Extent, share of lower zone lung volume": (pytest.approx(15.0), "%")}
    for subtype, p in result.subtype_probabilities.items():
        assert _numeric(by_id[f"subtype: {subtype}"])["Zero-shot montage probability"][0] == pytest.approx(p, abs=1e-6)
    assert _numeric(by_id["pattern: reticulation"])["Extent, share of lung volume"][0] == pytest.approx(20.0)
    # Each group points at its segment; the lung groups at segment 1 of the lung SEG.
    referenced = by_id[f"prompt: {prompt}"].referenced_segment
    assert referenced.referenced_sop_instance_uid == seg.SOPInstanceUID and referenced.referenced_segment_numbers == [1]
    assert referenced.source_series_for_segmentation.value == SERIES_UID
    pattern_ref = by_id["pattern: reticulation"].referenced_segment
    assert pattern_ref.referenced_sop_instance_uid == patterns.SOPInstanceUID
    assert pattern_ref.referenced_segment_numbers == [result.patterns.names.index("reticulation") + 1]
    # The model's meaning is coded: tiny-random has random weights.
    evaluation = by_id[f"prompt: {prompt}"].get_qualitative_evaluations()[0]
    assert evaluation.value.meaning == "No" and not result.model_meaningful
    # The evidence lists every source instance of the source series, and the SEGs.
    evidence = {item.SeriesInstanceUID: {r.ReferencedSOPInstanceUID for r in item.ReferencedSOPSequence}
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for item in study.ReferencedSeriesSequence}
    assert evidence[SERIES_UID] == {d.SOPInstanceUID for d in sources}
    assert {seg.SOPInstanceUID} == evidence[seg.SeriesInstanceUID]


def test_outputs_name_the_dicom_files_and_keep_the_patient_out_of_the_rest(written):
    scan, result, out = written
    manifest = json.loads((out / outputs.MANIFEST_NAME).read_text(encoding="utf-8"))
    assert {"lung_mask.seg.dcm", "patterns.seg.dcm", "result.sr.dcm"} <= set(manifest["files"])
    notes = json.loads((out / "result.json").read_text(encoding="utf-8"))["notes"]
    assert any("DICOM results written" in n and "result.sr.dcm" in n for n in notes)
    for name in ("result.json", "report.html", "patches.csv"):
        text = (out / name).read_text(encoding="utf-8")
        assert "Testpatient" not in text and "ZSILD-TEST-1" not in text
    assert "result.sr.dcm" in (out / "report.html").read_text(encoding="utf-8")


DCIODVFY = shutil.which("dciodvfy")


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy not installed (apt-get install dicom3tools)")
@pytest.mark.parametrize("name", ["lung_mask.seg.dcm", "patterns.seg.dcm", "result.sr.dcm", "report.pdf.dcm"])
def test_dciodvfy_finds_no_errors(written, name):
    _, _, out = written
    if not (out / name).exists():
        pytest.skip(f"{name} not written here: {pdf_engine_problem()}")
    lines = dciodvfy(out / name)
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, errors[:10]
    assert any(line.strip() in ("Segmentation", "Comprehensive3DSR", "EncapsulatedPDF") for line in lines)
    # The one warning about our private scheme is dciodvfy's list of known designators: it is declared.
    odd = [line for line in lines if line.startswith("Warning") and "99ZSILD" in line]
    assert all("Unrecognized defined term <99ZSILD>" in line for line in odd)


def dciodvfy(path) -> list:
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    return (run.stdout + run.stderr).splitlines()


def test_interval_series_frames_stay_on_their_uneven_slices(tmp_path, phantom_scan, tiny_model):
    keep = [k for k in range(phantom_scan.hu.shape[0]) if k % 5 in (0, 1)]  # gaps alternate 5 mm and 20 mm
    write_ct_series(tmp_path / "series", phantom_scan, keep)
    scan, result = analysed_dicom(tmp_path / "series", tiny_model, with_patterns=False)
    assert scan.slice_positions_mm is not None
    out = outputs.write_outputs(result, scan, tmp_path / "out")
    assert not (out / "patterns.seg.dcm").exists()
    check_segmentation_on_sources(hd.seg.segread(out / "lung_mask.seg.dcm"), sources_of(scan), {1: result.lung_mask})


def test_no_dicom_results_for_other_inputs_or_when_switched_off(tmp_path, phantom_scan, tiny_model, written):
    from ZeroShotILDLib.pipeline import Analyzer

    result = Analyzer(tiny_settings(patch_mm=20.0), model=tiny_model).analyze(phantom_scan)
    out = outputs.write_outputs(result, phantom_scan, tmp_path / "nifti")
    assert not list(out.glob("*.dcm"))
    assert not any("DICOM" in n for n in result.notes)  # a NIfTI user is not told about DICOM
    out = outputs.write_outputs(result, phantom_scan, tmp_path / "asked", dicom=True)
    assert not list(out.glob("*.dcm")) and any("DICOM results (SEG, SR) not written" in n for n in result.notes)
    # A re-run with them switched off removes the earlier DICOM results (ours, in the manifest).
    scan, dicom_result, first = written
    rerun = shutil.copytree(first, tmp_path / "rerun")
    (rerun / "my_notes.txt").write_text("mine", encoding="utf-8")
    outputs.write_outputs(dicom_result, scan, rerun, dicom=False)
    assert not list(rerun.glob("*.dcm")) and (rerun / "my_notes.txt").is_file()
    manifest = json.loads((rerun / outputs.MANIFEST_NAME).read_text(encoding="utf-8"))
    assert not any(n.endswith(".dcm") for n in manifest["files"])


def test_without_highdicom_a_note_says_how_to_get_it(tmp_path, phantom_scan, tiny_model, monkeypatch, capsys):
    write_ct_series(tmp_path / "series", phantom_scan)
    monkeypatch.setattr(dicom_results, "highdicom_available", lambda: False)
    scan, result = analysed_dicom(tmp_path / "series", tiny_model, with_patterns=False)
    out = outputs.write_outputs(result, scan, tmp_path / "out")
    assert not list(out.glob("*.dcm"))
    assert any("highdicom is not installed" in n and "zeroshot-ild[dicom]" in n for n in result.notes)
    # Asked for explicitly: refused before any work, with one line.
    code = cli.main(["analyze", str(tmp_path / "series"), "-o", str(tmp_path / "cli"), "--dicom-results",
                     "--model", "tiny-random", "--device", "cpu", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_INPUT and len(err) == 1 and "zeroshot-ild[dicom]" in err[0]
    assert not (tmp_path / "cli").exists()


def test_cli_writes_dicom_results_by_default_and_not_with_the_off_switch(tmp_path, phantom_scan, capsys):
    write_ct_series(tmp_path / "series", phantom_scan)
    args = ["--model", "tiny-random", "--device", "cpu", "--patch-mm", "20", "--mode", "exact", "-q"]
    assert cli.main(["analyze", str(tmp_path / "series"), "-o", str(tmp_path / "on"), *args]) == 0
    pdf = {dicom_results.PDF_DICOM_NAME} if not pdf_engine_problem() else set()
    assert {p.name for p in (tmp_path / "on").glob("*.dcm")} == {"lung_mask.seg.dcm", "patterns.seg.dcm",
                                                                  "result.sr.dcm"} | pdf
    assert cli.main(["analyze", str(tmp_path / "series"), "-o", str(tmp_path / "off"), "--no-dicom-results",
                     *args]) == 0
    assert not list((tmp_path / "off").glob("*.dcm"))
    assert PATIENT not in capsys.readouterr().out


def test_real_osic_series(tmp_path, tiny_model):
    folder = shared_data("real", "ct", "osic_ipf_sparse")
    from ZeroShotILDLib.pipeline import Analyzer

    scan = read_scan(folder)
    assert scan.dicom_files is not None and len(scan.dicom_files) == scan.hu.shape[0]
    result = Analyzer(tiny_settings(patch_mm=30.0, slice_step_mm=1.0), model=tiny_model).analyze(scan)
    out = outputs.write_outputs(result, scan, tmp_path / "out")
    sources = sources_of(scan)
    check_segmentation_on_sources(hd.seg.segread(out / "lung_mask.seg.dcm"), sources, {1: result.lung_mask})
    sr = hd.sr.srread(out / "result.sr.dcm")
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert len(sr.content.get_volumetric_roi_measurement_groups()) == (
        len(result.finding_probabilities) + len(result.subtype_probabilities) + len(result.patterns.extent))
    if DCIODVFY:
        for name in ("lung_mask.seg.dcm", "result.sr.dcm"):
            run = subprocess.run([DCIODVFY, str(out / name)], capture_output=True, text=True, timeout=120)
            assert not [x for x in (run.stdout + run.stderr).splitlines() if x.startswith("Error")]


def test_patient_name_is_never_shown_in_warnings_or_output(tmp_path, phantom_scan, tiny_model, capsys):
    import warnings

    folder = tmp_path / "series"
    write_ct_series(folder, phantom_scan)
    for f in folder.iterdir():  # a one-part name, which highdicom warns about, quoting it
        ds = pydicom.dcmread(f)
        ds.PatientName = "ONEPARTNAMEXYZ"
        ds.save_as(f)
    scan, result = analysed_dicom(folder, tiny_model, with_patterns=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = outputs.write_outputs(result, scan, tmp_path / "out")
    assert (out / "lung_mask.seg.dcm").is_file()
    assert pydicom.dcmread(out / "result.sr.dcm").PatientName == "ONEPARTNAMEXYZ"  # carried, as PACS needs
    assert not [w for w in caught if "ONEPARTNAMEXYZ" in str(w.message)]
    captured = capsys.readouterr()
    assert "ONEPARTNAMEXYZ" not in captured.out + captured.err


def test_a_series_breaking_dicom_rules_gets_a_note_and_the_rest_of_the_result(tmp_path, phantom_scan, tiny_model):
    folder = tmp_path / "series"
    write_ct_series(folder, phantom_scan)
    for k, f in enumerate(sorted(folder.iterdir())):  # every slice names its own study: not one series
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.8.498.3000.{k + 1}"
        ds.save_as(f)
    scan, result = analysed_dicom(folder, tiny_model, with_patterns=False)
    out = outputs.write_outputs(result, scan, tmp_path / "out")
    assert not list(out.glob("*.dcm"))
    assert (out / "result.json").is_file() and (out / "report.html").is_file()
    notes = json.loads((out / "result.json").read_text(encoding="utf-8"))["notes"]
    assert any("DICOM results (SEG, SR) not written: the source series' headers do not allow it" in n for n in notes)


def test_error_reasons_lose_patient_identifiers():
    source = pydicom.Dataset()
    source.PatientName, source.PatientID = "Doe^Jane", "PID-77"
    reason = dicom_results._reason_without_patient(ValueError("bad name Doe^Jane for PID-77\nmore"), source)
    assert reason == "bad name ... for ..."


# ----------------------------------------------------------------------------------------------
# Issue 21: the report in PACS, the disclaimer, the private scheme, refusals in one line
# ----------------------------------------------------------------------------------------------
def test_report_is_an_encapsulated_pdf_in_the_source_study(written):
    scan, result, out = written
    if pdf_engine_problem():
        pytest.skip(f"report.pdf not rendered here: {pdf_engine_problem()}")
    from pydicom.uid import EncapsulatedPDFStorage

    ds = pydicom.dcmread(out / dicom_results.PDF_DICOM_NAME)
    sources = sources_of(scan)
    assert ds.SOPClassUID == EncapsulatedPDFStorage and ds.Modality == "DOC"
    assert ds.StudyInstanceUID == sources[0].StudyInstanceUID and ds.PatientName == PATIENT
    assert ds.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    document = bytes(ds.EncapsulatedDocument)[:int(ds.get("EncapsulatedDocumentLength", len(ds.EncapsulatedDocument)))]
    assert document == (out / PDF_NAME).read_bytes() and document.startswith(b"%PDF-")
    assert "not for diagnosis" in ds.SeriesDescription and dicom_results.RESEARCH_TEXT in ds.DocumentTitle
    shown = {sources[z].SOPInstanceUID for z in best_slices(result)}
    assert {item.ReferencedSOPInstanceUID for item in ds.SourceInstanceSequence} == shown
    manifest = json.loads((out / outputs.MANIFEST_NAME).read_text(encoding="utf-8"))
    assert {PDF_NAME, dicom_results.PDF_DICOM_NAME} <= set(manifest["files"])


def test_series_descriptions_keep_the_disclaimer_and_the_sr_the_whole_notice(written):
    _, result, out = written
    for path in out.glob("*.dcm"):
        description = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesDescription)
        assert len(description) <= 64 and description.endswith("not for diagnosis"), (path.name, description)
    sr = pydicom.dcmread(out / "result.sr.dcm")
    assert not result.model_meaningful and "NOT meaningful" in sr.SeriesDescription
    texts = [item.TextValue for item in sr.ContentSequence if item.ValueType == "TEXT"]
    assert any(dicom_results.RESEARCH_TEXT in text and result.model_warning in text for text in texts)
    for what in ("results, scores NOT meaningful", "a very long name of a series " * 4):
        text = dicom_results.series_description(what)
        assert len(text) <= 64 and text.endswith("not for diagnosis")


def _designators(dataset, found):
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value:
                _designators(item, found)
        elif element.keyword == "CodingSchemeDesignator":
            found.add(str(element.value))
    return found


def test_private_coding_scheme_is_declared_in_every_object(written):
    _, _, out = written
    for name in ("lung_mask.seg.dcm", "patterns.seg.dcm", "result.sr.dcm"):
        ds = pydicom.dcmread(out / name, stop_before_pixels=True)
        declared = {str(item.CodingSchemeDesignator): item for item in ds.CodingSchemeIdentificationSequence}
        used = _designators(ds, set())
        private = {d for d in used if d.startswith("99")}
        assert private == {dicom_results.SCHEME} and private <= set(declared), name
        item = declared[dicom_results.SCHEME]
        assert item.CodingSchemeName and item.CodingSchemeVersion and item.CodingSchemeResponsibleOrganization


def test_a_stripped_series_gets_one_plain_line_why(tmp_path, phantom_scan, tiny_model, capfd):
    folder = tmp_path / "series"
    write_ct_series(folder, phantom_scan)
    for f in folder.iterdir():  # as in an LIDC export: no Modality, no Frame of Reference
        ds = pydicom.dcmread(f)
        del ds.Modality, ds.FrameOfReferenceUID
        ds.save_as(f)
    scan, result = analysed_dicom(folder, tiny_model, with_patterns=False)
    out = outputs.write_outputs(result, scan, tmp_path / "out")
    assert not list(out.glob("*.dcm"))
    lines = [n for n in result.notes if "DICOM results" in n]
    assert lines == ["DICOM results (SEG, SR) not written: the source slices have no Modality and Frame of "
                     "Reference UID, which DICOM needs to place results on them (a stripped or anonymised export); "
                     "the NIfTI results are complete"]
    assert "Traceback" not in capfd.readouterr().err


def test_real_two_slice_lidc_input_is_refused_in_one_plain_line(tmp_path, tiny_model):
    folder = shared_data("real", "ct", "lidc_slices")
    from ZeroShotILDLib.pipeline import Analyzer

    scan = read_scan(folder)
    result = Analyzer(tiny_settings(patch_mm=20.0), model=tiny_model).analyze(scan)
    out = outputs.write_outputs(result, scan, tmp_path / "out")
    assert not list(out.glob("*.dcm"))
    line = next(n for n in result.notes if "DICOM results" in n)
    assert "have no Modality and Frame of Reference UID" in line and "object has no attribute" not in line


def test_strings_from_the_source_are_made_valid_for_their_vr(tmp_path, phantom_scan, tiny_model, capfd):
    folder = tmp_path / "series"
    write_ct_series(folder, phantom_scan)
    import warnings

    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        warnings.filterwarnings("ignore", category=UserWarning, module="pydicom")  # the test breaks the rules itself
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "M\u00fcller^J\u00fcrgen"
        ds.StudyDescription = "CHEST HRCT " * 10 + "\x07bell"  # 110 characters and a control character (LO: 64)
        ds.AccessionNumber = "ACC-" + "9" * 30  # SH: 16
        ds.StudyDate = "2024-01-02"  # DA is YYYYMMDD
        ds.PatientID = "ID\x0142"
        ds.save_as(f)
    scan, result = analysed_dicom(folder, tiny_model, with_patterns=False)
    out = outputs.write_outputs(result, scan, tmp_path / "out")
    err = capfd.readouterr().err
    assert "pydicom" not in err and "Warning" not in err and "M\u00fcller" not in err
    written = sorted(out.glob("*.dcm"))
    assert len(written) >= 2
    for path in written:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.SpecificCharacterSet == "ISO_IR 192", path.name  # UTF-8, declared
        assert str(ds.PatientName) == "M\u00fcller^J\u00fcrgen"
        assert len(ds.StudyDescription) <= 64 and "\x07" not in ds.StudyDescription
        assert len(ds.AccessionNumber) <= 16 and ds.StudyDate == "20240102" and ds.PatientID == "ID42"
        if DCIODVFY:
            assert not [x for x in dciodvfy(path) if x.startswith("Error")], path.name


@pytest.mark.parametrize("value, vr, want", [
    ("a\x00b\x1bc", "LO", "abc"), ("x" * 80, "LO", "x" * 64), ("line\r\nnext\x07", "LT", "line\r\nnext"),
    ("axial, helical", "CS", "AXIAL HELICAL"), ("2024-01-02", "DA", "20240102"), ("1/2/24", "DA", ""),
    ("12:30:00", "TM", "123000"), ("Doe^Jane" + "x" * 70, "PN", "Doe^Jane" + "x" * 56), ("a\\b", "SH", "ab"),
])
def test_sanitised_value(value, vr, want):
    assert dicom_results.sanitised_value(value, vr) == want
