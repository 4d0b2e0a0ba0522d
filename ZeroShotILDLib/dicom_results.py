"""DICOM results for a DICOM input, for PACS users: the lung mask (and the pattern map) as DICOM SEG,
probabilities and extent as a DICOM SR Measurement Report (TID 1500), all referencing the source series.

Built with highdicom (optional: ``pip install 'zeroshot-ild[dicom]'``). Research users keep the
NIfTI files; these are written beside them when the scan was read from a DICOM series whose slices
the analysis used as they are (``Scan.dicom_files``). A series resampled on reading (gantry tilt,
sagittal or coronal slices turned axial) and multi-frame files get a note instead: the mask's voxels
would not lie on the source frames.

Every object carries the source's patient and study modules (DICOM requires them and PACS files by
them); highdicom copies them from the source headers. Nothing of them is logged or shown.

Zero-shot probabilities and extents have no standard codes: they are coded in the private scheme
``99ZSILD`` (the ``99`` prefix is DICOM's mark of a local scheme), the lung by SNOMED CT.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from . import __version__
from .results import AnalysisResult
from .scan import Scan

LUNG_SEG_NAME = "lung_mask.seg.dcm"
PATTERNS_SEG_NAME = "patterns.seg.dcm"
SR_NAME = "result.sr.dcm"
INSTALL_HINT = "pip install 'zeroshot-ild[dicom]' (highdicom and pydicom)"
#: Private coding scheme of this tool's concepts (DICOM PS3.16: designators beginning 99 are local).
SCHEME = "99ZSILD"
MANUFACTURER = "zeroshot-ild"
#: Series numbers of the derived series, high so they sort after the scanner's own.
SERIES_NUMBERS = {LUNG_SEG_NAME: 9901, PATTERNS_SEG_NAME: 9902, SR_NAME: 9903}
RESEARCH_LABEL = "research use only, not for diagnosis"
ZONES = ("upper", "middle", "lower", "left", "right", "subpleural", "central")


def highdicom_available() -> bool:
    try:
        import highdicom  # noqa: F401
        import pydicom  # noqa: F401
    except ImportError:
        return False
    return True


def write_dicom_results(result: AnalysisResult, scan: Scan, folder, *, enabled: Optional[bool] = None,
                        extent: Optional[Mapping] = None, pattern_map: Optional[np.ndarray] = None,
                        pattern_names: Optional[Mapping[int, str]] = None,
                        pattern_extent: Optional[Mapping] = None) -> list:
    """Write the DICOM results into ``folder``; return the names written (empty when none).

    ``enabled``: False writes nothing; None (default) writes them for a DICOM input when highdicom
    is installed and otherwise adds a note saying how to get them; True also notes why none were
    written for a non-DICOM input. Optional inputs: ``extent`` (result.json's ``extent``),
    ``pattern_map`` (label per voxel, [z, y, x], 0 = none) with ``pattern_names`` (label -> name)
    and ``pattern_extent`` (name -> lung fraction or {"lung_fraction": f}).
    """
    if enabled is False:
        return []
    if scan.dicom_files is None or len(scan.dicom_files) != scan.hu.shape[0]:
        if enabled:
            result.notes.append("DICOM results (SEG, SR) not written: they need a DICOM series read slice by slice "
                                "on its own planes (not a NIfTI/NRRD file, a multi-frame file, or a series "
                                "resampled for gantry tilt or turned axial)")
        return []
    if not highdicom_available():
        result.notes.append(f"DICOM results (SEG, SR) not written: highdicom is not installed; {INSTALL_HINT}")
        return []
    import pydicom

    sources = [_with_type2_attributes(pydicom.dcmread(f, stop_before_pixels=True)) for f in scan.dicom_files]
    ny, nx = scan.hu.shape[1:]
    if any((int(d.Rows), int(d.Columns)) != (ny, nx) for d in sources):
        result.notes.append("DICOM results (SEG, SR) not written: the source slices' size differs from the "
                            "analysed volume's")
        return []
    try:
        with warnings.catch_warnings():
            # highdicom's warnings quote header values (a patient name it finds odd): never shown.
            warnings.simplefilter("ignore")
            objects = {LUNG_SEG_NAME: lung_segmentation(result.lung_mask, sources)}
            if pattern_map is not None and pattern_names:
                patterns_seg = pattern_segmentation(pattern_map, pattern_names, sources)
                if patterns_seg is not None:
                    objects[PATTERNS_SEG_NAME] = patterns_seg
            objects[SR_NAME] = measurement_report(result, sources, objects[LUNG_SEG_NAME], extent=extent,
                                                  patterns_seg=objects.get(PATTERNS_SEG_NAME),
                                                  pattern_extent=pattern_extent)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # The analysis stands without them: a series whose headers break DICOM's rules (slices
        # naming different studies, no frame of reference) cannot be referenced by a SEG.
        result.notes.append(f"DICOM results (SEG, SR) not written: the source series' headers do not allow it "
                            f"({_reason_without_patient(exc, sources[0])})")
        return []
    folder = Path(folder)
    written = []
    for name, dataset in objects.items():
        dataset.save_as(folder / name)
        written.append(name)
    result.notes.append("DICOM results written for PACS: " + ", ".join(written) + " (they reference the source "
                        "series and carry its patient and study data)")
    return written


def _reason_without_patient(exc: Exception, source) -> str:
    """The first line of an error, with any patient identifier of ``source`` in it blanked out."""
    reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs"):
        value = str(source.get(keyword, "") or "")
        if len(value) > 1:
            reason = reason.replace(value, "...")
    return reason


#: Patient and study attributes DICOM requires to be present, empty if unknown (Type 2). Anonymised
#: series often drop them (the OSIC data have no PatientBirthDate); highdicom copies them as they are.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "AccessionNumber", "StudyID")


def _with_type2_attributes(dataset):
    """The source header (in memory only) with missing Type 2 patient/study attributes present and empty,
    and its SOP Class UID from the file meta header where the data set lacks it (seen in anonymised data)."""
    meta = getattr(dataset, "file_meta", None)
    if "SOPClassUID" not in dataset and meta is not None and "MediaStorageSOPClassUID" in meta:
        dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    for keyword in _TYPE2:
        if keyword not in dataset:
            setattr(dataset, keyword, "")
    return dataset


# ----------------------------------------------------------------------------------------------
# SEG
# ----------------------------------------------------------------------------------------------
def _algorithm():
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(name="zeroshot-ild", family=codes.cid7162.ArtificialIntelligence,
                                              version=__version__)


def _coding_schemes() -> list:
    """Names the private scheme in the object (Coding Scheme Identification Sequence)."""
    import highdicom as hd

    return [hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=SCHEME, name="ZeroShotILD concepts", responsible_organization="zeroshot-ild")]


def _private(value: str, meaning: str):
    """A concept of this tool's scheme; DICOM limits a code meaning to 64 characters."""
    import highdicom as hd

    return hd.sr.CodedConcept(value=value[:16], scheme_designator=SCHEME, meaning=meaning[:64])


def _segmentation(pixels: np.ndarray, descriptions: list, sources: Sequence, name: str, description: str):
    import highdicom as hd
    from pydicom.uid import generate_uid

    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(),
        series_number=SERIES_NUMBERS[name], sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name="ZeroShotILD", software_versions=__version__,
        device_serial_number="none", series_description=f"{description} ({RESEARCH_LABEL})"[:64],
        omit_empty_frames=True, coding_schemes=_coding_schemes())
    return seg


def lung_segmentation(lung_mask: np.ndarray, sources: Sequence):
    """The lung mask [z, y, x] as a one-segment binary DICOM SEG over ``sources`` (one per slice, z order)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    lung = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Lungs", segmented_property_category=codes.SCT.Organ,
        segmented_property_type=codes.SCT.Lung, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(), tracking_uid=hd.UID(), tracking_id="zeroshot-ild lung mask")
    return _segmentation(np.asarray(lung_mask, dtype=np.uint8), [lung], sources, LUNG_SEG_NAME,
                         "ZeroShotILD lung mask")


def pattern_segmentation(pattern_map: np.ndarray, pattern_names: Mapping[int, str], sources: Sequence):
    """The pattern map (label per voxel, 0 = none) as a binary SEG with one segment per named label.

    DICOM numbers segments 1..N without gaps: label values are renumbered in ascending order, and
    each segment keeps its pattern name as its label. None when no label is named.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    labels = sorted(int(v) for v in pattern_names if int(v) > 0)
    if not labels:
        return None
    segment_of = np.zeros(max(labels) + 1, dtype=np.uint8)
    descriptions = []
    for number, value in enumerate(labels, start=1):
        segment_of[value] = number
        name = str(pattern_names[value])
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=_private(f"PATTERN{value}", name),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=_algorithm(),
            tracking_uid=hd.UID(), tracking_id=f"zeroshot-ild pattern {name}"[:64]))
    values = np.asarray(pattern_map)
    pixels = np.where((values > 0) & (values <= labels[-1]), segment_of[np.clip(values, 0, labels[-1])], 0)
    return _segmentation(pixels.astype(np.uint8), descriptions, sources, PATTERNS_SEG_NAME,
                         "ZeroShotILD pattern map")


# ----------------------------------------------------------------------------------------------
# SR
# ----------------------------------------------------------------------------------------------
def _fraction(value) -> Optional[float]:
    try:
        v = float(value.get("lung_fraction") if isinstance(value, Mapping) else value)
    except (TypeError, ValueError, AttributeError):
        return None
    return v if np.isfinite(v) else None


def measurement_report(result: AnalysisResult, sources: Sequence, lung_seg, *, extent: Optional[Mapping] = None,
                       patterns_seg=None, pattern_extent: Optional[Mapping] = None):
    """A Comprehensive 3D SR, TID 1500: one measurement group per prompt, subtype and pattern.

    Prompt and subtype groups refer to the lung segment of ``lung_seg`` and hold the montage-level
    probability (unit 1), whether the model's scores are meaningful for this scan (Yes/No), and
    with ``extent`` the share of the lung and of each zone judged positive (%). Pattern groups
    refer to their segment of ``patterns_seg`` and hold the share of the lung.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    algorithm = hd.sr.AlgorithmIdentification(name="zeroshot-ild", version=__version__,
                                              parameters=[f"model={result.model_name}"])
    lung_site = [hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)]
    meaningful = hd.sr.QualitativeEvaluation(
        name=_private("MEANINGFUL", "Model scores meaningful for this scan"),
        value=codes.SCT.Yes if result.model_meaningful else codes.SCT.No)
    source_series = hd.sr.SourceSeriesForSegmentation(sources[0].SeriesInstanceUID)

    def calibrated(entry):
        """Whether a normal-lung reference decided the extent (no: uncalibrated, the text contrast alone)."""
        return hd.sr.QualitativeEvaluation(
            name=_private("CALIBRATED", "Extent calibrated against normal lungs"),
            value=codes.SCT.Yes if entry.get("calibrated") else codes.SCT.No)

    def segment(seg, number):
        return hd.sr.ReferencedSegment(sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                                       segment_number=number, source_series=source_series)

    def probability(value):
        return hd.sr.Measurement(name=_private("MONTAGEPROB", "Zero-shot montage probability"),
                                 value=float(value), unit=codes.UCUM.NoUnits, algorithm_id=algorithm)

    def percent(code, meaning, value):
        return hd.sr.Measurement(name=_private(code, meaning), value=round(100.0 * value, 4),
                                 unit=codes.UCUM.Percent, algorithm_id=algorithm)

    groups = []
    # Prompts with a probability, then any with extent only (the pattern prompts, say).
    prompts = list(result.finding_probabilities) + [q for q in (extent or {}) if q not in result.finding_probabilities]
    for k, prompt in enumerate(prompts, start=1):
        value = _fraction(result.finding_probabilities.get(prompt))
        measurements = [probability(value)] if value is not None else []
        entry = (extent or {}).get(prompt) or {}
        whole = _fraction(entry.get("lung_fraction"))
        if whole is not None:
            measurements.append(percent("EXTENTLUNG", "Extent, share of lung volume", whole))
        for zone in ZONES:
            share = _fraction((entry.get("by_zone") or {}).get(zone))
            if share is not None:
                measurements.append(percent(f"EXTENT{zone.upper()}"[:16], f"Extent, share of {zone} zone lung volume",
                                            share))
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"prompt: {prompt}"),
            referenced_segment=segment(lung_seg, 1), finding_type=_private(f"PROMPT{k}", prompt),
            finding_sites=lung_site, algorithm_id=algorithm, measurements=measurements,
            qualitative_evaluations=[meaningful] + ([calibrated(entry)] if whole is not None else [])))
    for k, (subtype, value) in enumerate(result.subtype_probabilities.items(), start=1):
        if _fraction(value) is None:
            continue
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"subtype: {subtype}"),
            referenced_segment=segment(lung_seg, 1), finding_type=_private(f"SUBTYPE{k}", subtype),
            finding_sites=lung_site, algorithm_id=algorithm, measurements=[probability(value)],
            qualitative_evaluations=[meaningful]))
    if patterns_seg is not None and pattern_extent:
        for number, description in enumerate(patterns_seg.SegmentSequence, start=1):
            label = str(description.SegmentLabel)
            if label in prompts:
                continue  # the prompt's group above carries this finding's extent (one rule, one number)
            value = pattern_extent.get(label)
            share = _fraction(value)
            if share is None:
                continue
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(),
                                                             identifier=f"pattern: {description.SegmentLabel}"),
                referenced_segment=segment(patterns_seg, number),
                finding_type=_private(f"PATTERN{number}", str(description.SegmentLabel)), finding_sites=lung_site,
                algorithm_id=algorithm, measurements=[percent("EXTENTLUNG", "Extent, share of lung volume", share)],
                qualitative_evaluations=[meaningful] + ([calibrated(value)] if isinstance(value, Mapping) else [])))
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name="zeroshot-ild", manufacturer_name=MANUFACTURER,
            model_name=result.model_name[:64])))
    content = hd.sr.MeasurementReport(observation_context=context, procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
                                      imaging_measurements=groups, title=codes.cid7021.ImagingMeasurementReport)
    evidence = list(sources) + [lung_seg] + ([patterns_seg] if patterns_seg is not None else [])
    description = "ZeroShotILD results" + ("" if result.model_meaningful else " (scores NOT meaningful)")
    return hd.sr.Comprehensive3DSR(
        evidence=evidence, content=content, series_instance_uid=generate_uid(), series_number=SERIES_NUMBERS[SR_NAME],
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        coding_schemes=_coding_schemes(), series_description=f"{description}, {RESEARCH_LABEL}"[:64])
