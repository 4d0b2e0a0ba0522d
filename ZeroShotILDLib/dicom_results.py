"""DICOM results for a DICOM input, for PACS users: the lung mask (and the pattern map) as DICOM SEG,
probabilities and extent as a DICOM SR Measurement Report (TID 1500), and the report as an
Encapsulated PDF, all in the source study and referencing the source series.

Built with highdicom and pydicom (optional: ``pip install 'zeroshot-ild[dicom]'``). Research users keep
the NIfTI files; these are written beside them when the scan was read from a DICOM series whose slices
the analysis used as they are (``Scan.dicom_files``). A series resampled on reading (gantry tilt,
sagittal or coronal slices turned axial) and multi-frame files get a note instead: the mask's voxels
would not lie on the source frames. A series whose headers lack what a reference needs (an anonymised
export without Modality or Frame of Reference) gets one plain note naming what is missing.

Every object carries the source's patient and study modules (DICOM requires them and PACS files by
them); highdicom copies them from the source headers. Nothing of them is logged or shown. Those
strings are first made valid for their value representation (length, characters; ``sanitised``) and
the objects declare UTF-8 (``ISO_IR 192``) when any of them is not ASCII, so a source that broke the
rules does not make our objects break them. pydicom's and highdicom's warnings (which quote header
values) are kept off stderr.

Zero-shot probabilities and extents have no standard codes: they are coded in the private scheme
``99ZSILD`` (the ``99`` prefix is DICOM's mark of a local scheme), declared in every object's Coding
Scheme Identification Sequence (name, version, responsible organisation); the lung by SNOMED CT. Validators that check
designators against DICOM's list (dciodvfy) still name ``99ZSILD`` as unrecognised: the declaration is
how DICOM says what a local scheme is, and there is no registry entry for it to find.
"""
from __future__ import annotations

import datetime as _dt
import logging
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from . import __version__
from .results import AnalysisResult
from .scan import Scan

LUNG_SEG_NAME = "lung_mask.seg.dcm"
PATTERNS_SEG_NAME = "patterns.seg.dcm"
SR_NAME = "result.sr.dcm"
PDF_DICOM_NAME = "report.pdf.dcm"
INSTALL_HINT = "pip install 'zeroshot-ild[dicom]' (highdicom and pydicom)"
#: Private coding scheme of this tool's concepts (DICOM PS3.16: designators beginning 99 are local).
SCHEME = "99ZSILD"
MANUFACTURER = "zeroshot-ild"
#: Series numbers of the derived series, high so they sort after the scanner's own.
SERIES_NUMBERS = {LUNG_SEG_NAME: 9901, PATTERNS_SEG_NAME: 9902, SR_NAME: 9903, PDF_DICOM_NAME: 9904}
RESEARCH_LABEL = "research use only, not for diagnosis"
#: Short enough for a Series Description (LO, 64 characters) with any of our series names in front.
SHORT_LABEL = "not for diagnosis"
#: The whole research-use notice, where DICOM allows long text (an SR TEXT item, the PDF's Document Title).
RESEARCH_TEXT = ("Research software, not a diagnostic device: not for clinical decisions. Zero-shot scores of a "
                 "vision-language model are not calibrated probabilities of disease.")
ZONES = ("upper", "middle", "lower", "left", "right", "subpleural", "central")
#: What a SEG needs of every source slice to reference it (PS3.3 C.8.20, highdicom's checks).
REQUIRED = (("Modality", "Modality"), ("SOPClassUID", "SOP Class UID"), ("SOPInstanceUID", "SOP Instance UID"),
            ("StudyInstanceUID", "Study Instance UID"), ("SeriesInstanceUID", "Series Instance UID"),
            ("FrameOfReferenceUID", "Frame of Reference UID"), ("ImagePositionPatient", "Image Position"),
            ("ImageOrientationPatient", "Image Orientation"), ("PixelSpacing", "Pixel Spacing"),
            ("SliceThickness", "Slice Thickness"))


def highdicom_available() -> bool:
    try:
        import highdicom  # noqa: F401
        import pydicom  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def quiet_dicom():
    """pydicom and highdicom report odd header values as warnings and log lines that quote them (a patient's
    name): inside this block neither reaches stderr."""
    loggers = [logging.getLogger(n) for n in ("pydicom", "highdicom")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def read_sources(files: Sequence) -> list:
    """The source slices' headers (no pixels), made fit to copy: Type 2 attributes present, strings valid."""
    import pydicom

    with quiet_dicom():
        return [sanitised(_with_type2_attributes(pydicom.dcmread(f, stop_before_pixels=True))) for f in files]


def missing_for_reference(sources: Sequence) -> list:
    """The names of what a reference to the source slices needs and some slice lacks (empty: all there)."""
    return [name for keyword, name in REQUIRED
            if any(keyword not in d or d.get(keyword) in (None, "") for d in sources)]


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
    sources = read_sources(scan.dicom_files)
    missing = missing_for_reference(sources)
    if missing:
        result.notes.append(f"DICOM results (SEG, SR) not written: the source slices have no {_and(missing)}, which "
                            "DICOM needs to place results on them (a stripped or anonymised export); the NIfTI "
                            "results are complete")
        return []
    ny, nx = scan.hu.shape[1:]
    if any((int(d.Rows), int(d.Columns)) != (ny, nx) for d in sources):
        result.notes.append("DICOM results (SEG, SR) not written: the source slices' size differs from the "
                            "analysed volume's")
        return []
    try:
        with quiet_dicom():
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
        # naming different studies) cannot be referenced by a SEG.
        missing = re.search(r"has no attribute '(\w+)'", str(exc))
        if isinstance(exc, AttributeError) and missing:  # an attribute highdicom needs and the check above misses
            result.notes.append(f"DICOM results (SEG, SR) not written: the source slices have no {missing[1]}, which "
                                "DICOM needs to place results on them; the NIfTI results are complete")
        else:
            result.notes.append(f"DICOM results (SEG, SR) not written: the source series' headers do not allow it "
                                f"({_reason_without_patient(exc, sources[0])})")
        return []
    folder = Path(folder)
    written = []
    for name, dataset in objects.items():
        declare_character_set(dataset)
        with quiet_dicom():
            dataset.save_as(folder / name)
        written.append(name)
    result.notes.append("DICOM results written for PACS: " + ", ".join(written) + " (they reference the source "
                        "series and carry its patient and study data)")
    return written


def _and(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


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
# Strings copied from the source: valid for their VR
# ----------------------------------------------------------------------------------------------
#: Longest value per VR (characters; PS3.5 6.2). PN: per component group.
MAX_LENGTH = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64, "LT": 10240, "PN": 64,
              "SH": 16, "ST": 1024, "TM": 14, "UI": 64}
#: VRs whose values may hold line breaks and tabs (text); the others hold no control character at all.
_TEXT_VRS = {"LT", "ST", "UT"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")  # keeps TAB, LF, FF, CR


def sanitised_value(value: str, vr: str) -> str:
    """``value`` made valid for ``vr``: control characters removed (text VRs keep TAB, LF, FF, CR), the
    backslash (DICOM's value separator) removed from single values, cut to the VR's length; CS upper-case
    letters, digits, space and underscore; DA/TM digits (a date that is not 8 digits is dropped: empty is
    DICOM's "unknown"). UIDs are not touched here: changing one would break the reference to its image."""
    text = str(value)
    text = (_TEXT_CONTROL if vr in _TEXT_VRS else _CONTROL).sub("", text)
    if vr == "CS":
        text = re.sub(r"[^A-Z0-9 _]", "", text.upper())
    elif vr == "DA":
        text = re.sub(r"[^0-9]", "", text)
        text = text if len(text) == 8 else ""
    elif vr == "TM":
        text = re.sub(r"[^0-9.]", "", text)
    elif vr in ("DS", "IS"):
        text = re.sub(r"[^0-9+\-.eE ]", "", text)
    if vr == "PN":
        return "=".join(group[:MAX_LENGTH["PN"]] for group in text.replace("\\", "").split("=")[:3])
    if vr not in _TEXT_VRS:
        text = text.replace("\\", "")
    limit = MAX_LENGTH.get(vr)
    return text[:limit] if limit else text


def sanitised(dataset):
    """``dataset`` (in memory) with every top-level string value valid for its VR (``sanitised_value``).
    Values that cannot be read as text under the declared character set are dropped to empty."""
    for element in dataset:
        vr = element.VR
        if vr == "UI" or (vr not in MAX_LENGTH and vr not in ("UT", "UC", "UR")) or element.value in (None, ""):
            continue
        if vr in ("DS", "IS") and not isinstance(element.value, (str, bytes)):
            continue  # already numbers (pydicom parsed them): valid by construction
        try:
            value = element.value
            if isinstance(value, bytes):
                value = value.decode("ascii", "replace").replace("\ufffd", "")
            if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
                cleaned = [sanitised_value(v, vr) for v in value]
                element.value = [v for v in cleaned if v != ""]
            else:
                element.value = sanitised_value(value, vr)
        except (TypeError, ValueError, UnicodeError):
            element.value = ""
    return dataset


def declare_character_set(dataset) -> None:
    """Declare UTF-8 (``ISO_IR 192``) when any string value of ``dataset`` (any depth) is not ASCII; pydicom
    then writes every string in it. ASCII-only objects keep the default repertoire (no declaration)."""
    def has_non_ascii(ds) -> bool:
        for element in ds:
            if element.VR == "SQ":
                if any(has_non_ascii(item) for item in element.value or []):
                    return True
            elif element.VR in MAX_LENGTH or element.VR in ("UT", "UC", "UR"):
                values = element.value if isinstance(element.value, (list, tuple)) or \
                    type(element.value).__name__ == "MultiValue" else [element.value]
                if any(not str(v).isascii() for v in values if v is not None):
                    return True
        return False

    if has_non_ascii(dataset):
        dataset.SpecificCharacterSet = "ISO_IR 192"
    elif "SpecificCharacterSet" in dataset:
        del dataset.SpecificCharacterSet


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

    # No Coding Scheme UID (Type 1C, only for schemes identified by an OID): dciodvfy would flag ours as an
    # unknown UID too, one more warning that says nothing a reader needs.
    return [hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=SCHEME, name="ZeroShotILD concepts", version=__version__, responsible_organization="zeroshot-ild")]


def series_description(what: str) -> str:
    """"ZeroShotILD <what>, research only, not for diagnosis", shortened to DICOM's 64 characters (LO) by
    dropping words of ``what`` or "research only", never "not for diagnosis"."""
    text = f"ZeroShotILD {what}, research only, {SHORT_LABEL}"
    if len(text) > 64:
        tail = f", {SHORT_LABEL}"
        text = f"ZeroShotILD {what}"[:64 - len(tail)].rstrip(" ,") + tail
    return text


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
        device_serial_number="none", series_description=series_description(description),
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
    return _segmentation(np.asarray(lung_mask, dtype=np.uint8), [lung], sources, LUNG_SEG_NAME, "lung mask")


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
    return _segmentation(pixels.astype(np.uint8), descriptions, sources, PATTERNS_SEG_NAME, "pattern map")


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
    # The whole research-use notice, which no Series Description (64 characters) can hold: a TEXT item at the
    # end of the report's root container (TID 1500 is extensible), shown by every SR viewer.
    content[0].ContentSequence.append(hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=RESEARCH_TEXT + ("" if result.model_meaningful else
                                                      f" The scores are NOT meaningful: {result.model_warning}"),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    evidence = list(sources) + [lung_seg] + ([patterns_seg] if patterns_seg is not None else [])
    description = "results" + ("" if result.model_meaningful else ", scores NOT meaningful")
    return hd.sr.Comprehensive3DSR(
        evidence=evidence, content=content, series_instance_uid=generate_uid(), series_number=SERIES_NUMBERS[SR_NAME],
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        coding_schemes=_coding_schemes(), series_description=series_description(description))


# ----------------------------------------------------------------------------------------------
# The report as an Encapsulated PDF in the source study
# ----------------------------------------------------------------------------------------------
#: Patient and study attributes copied from the source into the Encapsulated PDF (PS3.3 A.45.1: Patient,
#: General Study), so PACS files the report with its scan.
_COPIED = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientIdentityRemoved",
           "DeidentificationMethod", "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
           "AccessionNumber", "StudyDescription")


def encapsulated_pdf(pdf: bytes, source, *, referenced: Sequence = (), title: str = ""):
    """An Encapsulated PDF instance (PS3.3 A.45.1) holding ``pdf`` in the study of ``source`` (a sanitised
    source header: ``read_sources``), in a new series of its own. ``referenced``: the source headers of the
    images the PDF shows (Source Instance Sequence)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, EncapsulatedPDFStorage, ExplicitVRLittleEndian, generate_uid

    now = _dt.datetime.now()
    ds = Dataset()
    for keyword in _COPIED:
        if keyword in source:
            setattr(ds, keyword, source.get(keyword))
    for keyword in _TYPE2:  # required, empty when unknown
        if keyword not in ds:
            setattr(ds, keyword, "")
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = SERIES_NUMBERS[PDF_DICOM_NAME]
    ds.SeriesDescription = series_description("report")
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "ZeroShotILD"
    ds.SoftwareVersions = __version__
    ds.ConversionType = "WSD"  # made on a workstation, not scanned
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    # The page names the input by its file or folder name only, but that name is the user's and may
    # identify the patient: say so, the safe answer for de-identification tools.
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = sanitised_value(f"ZeroShotILD report. {RESEARCH_TEXT}", "ST")
    ds.ConceptNameCodeSequence = []
    refs = []
    for image in referenced:
        item = Dataset()
        item.ReferencedSOPClassUID = image.SOPClassUID
        item.ReferencedSOPInstanceUID = image.SOPInstanceUID
        refs.append(item)
    if refs:
        ds.SourceInstanceSequence = refs
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    if len(pdf) % 2:  # DICOM values have even length: padded with one NUL, and the true length stated
        ds.EncapsulatedDocumentLength = len(pdf)
        pdf = pdf + b"\0"
    ds.EncapsulatedDocument = pdf
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    declare_character_set(ds)
    return ds


def write_encapsulated_pdf(pdf: bytes, scan: Scan, path, key_slices: Sequence[int] = ()) -> str:
    """Write ``pdf`` as an Encapsulated PDF in the source study of ``scan`` to ``path``; "" when written,
    else one line saying why not."""
    files = scan.dicom_files
    if files is None or len(files) != scan.hu.shape[0]:
        return "the scan was not read from a DICOM series on its own planes"
    try:
        import pydicom  # noqa: F401
    except ImportError:
        return f"pydicom is not installed; {INSTALL_HINT}"
    picked = sorted({int(z) for z in key_slices if 0 <= int(z) < len(files)}) or [0]
    sources = read_sources([files[z] for z in picked])
    missing = [name for keyword, name in REQUIRED[1:5] if any(not d.get(keyword) for d in sources)]
    if missing:
        return f"the source slices have no {_and(missing)}"
    from pydicom.filewriter import dcmwrite

    with quiet_dicom():
        dataset = encapsulated_pdf(pdf, sources[0], referenced=sources)
        dcmwrite(path, dataset, enforce_file_format=True)
    return ""
