"""Manifest reading, validation messages and patient-level splits."""
import json
from pathlib import Path

import numpy as np
import pytest

from ZeroShotILDLib.errors import InputError
from zeroshot_ild_train.manifest import (
    ManifestRecord,
    check_patient_splits,
    parse_binary,
    read_manifest,
    split_by_patient,
    split_counts,
    write_manifest,
)


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "scans").mkdir()
    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz"):
        (tmp_path / "scans" / name).write_bytes(b"x")
    (tmp_path / "scans" / "dicom_d").mkdir()
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "b.txt").write_text("FINDINGS: Clear lungs.\nIMPRESSION: Normal.", encoding="utf-8")
    return tmp_path


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_phantom_cohort_manifest_reads_back(tmp_path):
    phantom = pytest.importorskip("ZeroShotILDLib.phantom")
    m = phantom.write_cohort(tmp_path / "cohort", 4, seed=2, shape_zyx=(8, 32, 32),
                             spacing_mm=(10.0, 10.0, 20.0))
    recs = read_manifest(m, require_report=True, require_ild=True)
    assert len(recs) == 4 and all(r.scan_path.is_file() for r in recs)
    # Multi-line quoted reports: each record is named by the line it starts on.
    lines = m.read_text(encoding="utf-8").splitlines()
    for r in recs:
        n = int(r.source.rsplit(" ", 1)[1])
        assert lines[n - 1].startswith(r.scan_id + ",")
        assert r.read_report().startswith("FINDINGS:")
        assert (r.subtype is not None) == (r.ild == 1)
    split = split_by_patient(recs, val_fraction=0.25, seed=0)
    assert sorted(r.split for r in split).count("val") == 1


def test_read_csv_all_columns(tree):
    m = _write(tree / "m.csv",
               "scan_path,report_text,report_path,ILD,subtype,label_Honeycombing,split,patient_id,extra_age\n"
               'scans/a.nii.gz,"FINDINGS: Reticulation, basal.\nIMPRESSION: UIP.",,yes,IPF,1,train,p1,71\n'
               "scans/b.nii.gz,,reports/b.txt,0,,no,,p2,\n"
               ",,,,,,,,\n"
               f"{tree / 'scans' / 'dicom_d'},,,,,,Validation,p3,\n")
    recs = read_manifest(m)
    assert len(recs) == 3
    a, b, d = recs
    assert a.scan_path == tree.resolve() / "scans" / "a.nii.gz"
    assert a.scan_id == "scans/a.nii.gz"
    assert a.ild == 1 and a.subtype == "IPF" and a.labels == {"honeycombing": 1}
    assert a.split == "train" and a.patient_id == "p1" and a.extra == {"age": "71"}
    assert a.read_report().startswith("FINDINGS: Reticulation, basal.")
    assert "Reticulation" not in repr(a)
    assert b.report_path == tree.resolve() / "reports" / "b.txt" and b.read_report().endswith("Normal.")
    assert b.ild == 0 and b.labels == {"honeycombing": 0} and b.split is None
    assert d.scan_path.is_dir() and d.split == "val" and d.ild is None and d.read_report() is None


def test_read_jsonl_with_nested_labels(tree):
    m = tree / "m.jsonl"
    lines = [
        {"scan_path": "scans/a.nii.gz", "report_text": "IMPRESSION: ILD.", "ild": True,
         "labels": {"GGO": 1, "honeycombing": "no"}, "patient_id": 17},
        {"scan_path": "scans/b.nii.gz", "ild": 0, "label_ggo": None},
    ]
    _write(m, "\n".join(json.dumps(x) for x in lines) + "\n\n")
    a, b = read_manifest(m)
    assert a.ild == 1 and a.labels == {"ggo": 1, "honeycombing": 0} and a.patient_id == "17"
    assert b.ild == 0 and b.labels == {"ggo": None}


@pytest.mark.parametrize("body, match", [
    ("scan_path,ild\nscans/a.nii.gz,maybe\n", r"m\.csv line 2, column ild: not a label; use 1/0"),
    ("scan_path,ild\nscans/zz.nii.gz,1\n", r"line 2, column scan_path: no such file or folder"),
    ("scan_path,ild\n,1\n", r"line 2, column scan_path: empty"),
    ("scan_path,splt\nscans/a.nii.gz,train\n", r"unknown column 'splt'"),
    ("scan_path,split\nscans/a.nii.gz,holdout\n", r"line 2, column split: not a split"),
    ("scan_path,ild,subtype\nscans/a.nii.gz,0,IPF\n", r"subtype is given but ild is 0"),
    ("scan_path,report_text,report_path\nscans/a.nii.gz,x,reports/b.txt\n", r"both report_text and report_path"),
    ("scan_path\nscans/a.nii.gz\nscans/a.nii.gz\n", r"line 3: the same scan_id as m\.csv line 2"),
    ("scan_path,split,patient_id\nscans/a.nii.gz,train,p1\nscans/b.nii.gz,test,p1\n",
     r"one patient has scans in train \(m\.csv line 2\) and test \(m\.csv line 3\)"),
    ("path,ild\nscans/a.nii.gz,1\n", r"no scan_path column"),
    ("scan_path,ild\nscans/a.nii.gz,1,extra\n", r"more values than header columns"),
    ("scan_path\n", r"has no rows"),
])
def test_csv_errors_are_one_line_and_name_row_and_column(tree, body, match):
    m = _write(tree / "m.csv", body)
    with pytest.raises(InputError, match=match) as e:
        read_manifest(m)
    assert "\n" not in str(e.value)


def test_require_flags_and_formats(tree):
    m = _write(tree / "m.csv", "scan_path,ild\nscans/a.nii.gz,\n")
    with pytest.raises(InputError, match="no report_text or report_path"):
        read_manifest(m, require_report=True)
    with pytest.raises(InputError, match="column ild: empty"):
        read_manifest(m, require_ild=True)
    with pytest.raises(InputError, match="unknown format"):
        read_manifest(_write(tree / "m.xlsx", "x"))
    with pytest.raises(InputError, match="line 1: not valid JSON"):
        read_manifest(_write(tree / "bad.jsonl", "{scan_path: 1}\n"))
    with pytest.raises(InputError, match="does not exist"):
        read_manifest(tree / "missing.csv")
    # Files need not exist when asked not to check (e.g. a manifest for another machine).
    m2 = _write(tree / "m2.csv", "scan_path\n/nowhere/x.nii.gz\n")
    assert read_manifest(m2, check_files=False)[0].scan_path == Path("/nowhere/x.nii.gz")


def test_parse_binary():
    assert [parse_binary(v) for v in ("1", "Yes", "TRUE", "positive", 1, True, 1.0)] == [1] * 7
    assert [parse_binary(v) for v in ("0", "no", "False", "neg", 0, False)] == [0] * 6
    assert [parse_binary(v) for v in ("", " ", None, "NaN", float("nan"))] == [None] * 5
    with pytest.raises(InputError):
        parse_binary(2, where="x")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_write_then_read_round_trip(tree, suffix):
    m = _write(tree / "m.csv",
               "scan_path,report_text,ild,subtype,label_ggo,split,patient_id,extra_site\n"
               'scans/a.nii.gz,"FINDINGS: A, b.\nIMPRESSION: C.",1,IPF,1,train,p1,x\n'
               "scans/b.nii.gz,,0,,,,p2,\n")
    recs = read_manifest(m)
    out = write_manifest(recs, tree / f"copy{suffix}")
    again = read_manifest(out)
    for r1, r2 in zip(recs, again):
        r1 = dict(vars(r1), source=None)
        r2 = dict(vars(r2), source=None)
        assert r1 == r2


def _records(patients):
    """patients: list of (patient_id, n_scans, split or None)."""
    out = []
    for pid, n, split in patients:
        for i in range(n):
            out.append(ManifestRecord(scan_path=Path(f"/s/{pid}_{i}"), scan_id=f"{pid}_{i}",
                                      patient_id=pid, split=split, source=f"line {len(out) + 2}"))
    return out


def test_split_by_patient_keeps_patients_together_and_is_seeded():
    recs = _records([(f"p{i}", 1 + i % 4, None) for i in range(60)])
    split = split_by_patient(recs, val_fraction=0.1, test_fraction=0.2, seed=3)
    by_patient = {}
    for r in split:
        by_patient.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(s) == 1 for s in by_patient.values())
    counts = split_counts(split)
    assert counts["val"]["patients"] == 6 and counts["test"]["patients"] == 12
    assert counts["train"]["patients"] == 42
    assert sum(c["scans"] for c in counts.values()) == len(recs)
    # Same seed, shuffled row order -> same assignment; another seed -> another one.
    again = split_by_patient(list(reversed(recs)), val_fraction=0.1, test_fraction=0.2, seed=3)
    assert {r.scan_id: r.split for r in again} == {r.scan_id: r.split for r in split}
    other = split_by_patient(recs, val_fraction=0.1, test_fraction=0.2, seed=4)
    assert {r.scan_id: r.split for r in other} != {r.scan_id: r.split for r in split}
    assert all(r.split is None for r in recs)  # inputs untouched


def test_split_by_patient_respects_existing_splits():
    recs = _records([("a", 2, "test"), ("b", 1, None), ("c", 3, None)])
    recs[1].split = None  # patient a's second scan has no split: it follows the first
    split = split_by_patient(recs + _records([(f"q{i}", 1, None) for i in range(20)]), seed=0)
    assert [r.split for r in split if r.patient_id == "a"] == ["test", "test"]
    assert sum(r.split == "val" for r in split) >= 1
    # Scans without a patient id are their own patient.
    lone = [ManifestRecord(scan_path=Path(f"/s/{i}"), scan_id=str(i)) for i in range(10)]
    assert split_counts(split_by_patient(lone, seed=1))["val"] == {"scans": 1, "patients": 1}


def test_split_errors():
    recs = _records([("a", 1, "train")]) + _records([("a", 1, "val")])
    recs[1].scan_id = "other"
    with pytest.raises(InputError, match="one patient has scans in train"):
        check_patient_splits(recs)
    with pytest.raises(InputError, match="leave some patients for training"):
        split_by_patient(_records([("a", 1, None)]), val_fraction=0.6, test_fraction=0.5)


REPORT = "FINDINGS: Basal reticulation in Mr Jonathan Smith. IMPRESSION: UIP pattern."


@pytest.mark.parametrize("body", [
    f'scan_path,report_text,ild\nscans/a.nii.gz,x,"{REPORT}"\n',  # report pasted one column too far
    f'scan_path,split\nscans/a.nii.gz,"{REPORT}"\n',
    f'scan_path,label_uip\nscans/a.nii.gz,"{REPORT}"\n',
    f'"{REPORT}",ild\nscans/a.nii.gz,1\n',  # no header row: the first row is data
    'scan_path,ild\nscans/Smith_Jonathan.nii.gz,1\n',  # a patient name in a missing file's path
    'scan_path,split,patient_id\nscans/a.nii.gz,train,Jonathan Smith\nscans/b.nii.gz,test,Jonathan Smith\n',
    'scan_path,scan_id\nscans/a.nii.gz,Jonathan Smith\nscans/b.nii.gz,Jonathan Smith\n',
])
def test_messages_never_echo_report_text_or_names(tree, body):
    """A cell's content (report text, a patient's name) never reaches a message: row and column do."""
    m = _write(tree / "m.csv", body)
    with pytest.raises(InputError) as e:
        read_manifest(m)
    msg = str(e.value)
    assert "\n" not in msg and "m.csv" in msg
    for secret in ("reticulation", "UIP pattern", "Jonathan", "Smith"):
        assert secret not in msg


def test_report_text_in_the_ild_column_stays_off_stderr(tree, capsys):
    from zeroshot_ild_train import cli

    m = _write(tree / "m.csv", f'scan_path,report_text,ild\nscans/a.nii.gz,x,"{REPORT}"\n')
    assert cli.main(["split", str(m), "--out", str(tree / "out.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "m.csv line 2, column ild: not a label" in err
    assert "reticulation" not in err and "Smith" not in err


def test_pixel_spacing_of_2d_rows_is_a_column(tmp_path):
    from PIL import Image

    from zeroshot_ild_train.preprocess import read_any_scan
    from ZeroShotILDLib.settings import AnalysisSettings

    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("scan_path,pixel_spacing_mm\na.png,0.7\n", encoding="utf-8")
    (record,) = read_manifest(tmp_path / "m.csv")
    assert record.pixel_spacing_mm == 0.7
    scan = read_any_scan(record.scan_path, AnalysisSettings(), record.pixel_spacing_mm)
    assert scan.spacing_mm[:2] == (0.7, 0.7) and scan.hu.shape == (1, 20, 30)
    assert read_any_scan(record.scan_path, AnalysisSettings()).spacing_mm[:2] == (1.0, 1.0)
    assert read_manifest(write_manifest([record], tmp_path / "back.csv"))[0].pixel_spacing_mm == 0.7
    (tmp_path / "bad.csv").write_text("scan_path,pixel_spacing_mm\na.png,wide\n", encoding="utf-8")
    with pytest.raises(InputError, match="pixel_spacing_mm: not a pixel size"):
        read_manifest(tmp_path / "bad.csv")


def test_stratified_split_keeps_the_class_balance():
    from zeroshot_ild_train.manifest import ManifestRecord, split_by_patient

    records = [ManifestRecord(scan_path=Path(f"{i}.nii"), scan_id=str(i), ild=int(i < 20), patient_id=f"P{i}")
               for i in range(100)]
    for seed in range(3):
        split = split_by_patient(records, val_fraction=0.1, test_fraction=0.5, seed=seed, stratify="ild")
        test = [r for r in split if r.split == "test"]
        val = [r for r in split if r.split == "val"]
        assert len(test) == 50 and sum(r.ild for r in test) == 10
        assert len(val) == 10 and sum(r.ild for r in val) == 2
