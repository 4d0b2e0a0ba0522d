"""Cohort summary (issue 14): `analyze` over several scans writes summary.csv beside the per-scan folders."""
import csv

import pytest

from test_outputs_safety import validate_result
from ZeroShotILDLib.cli import EXIT_PARTIAL, main
from ZeroShotILDLib.outputs import SUMMARY_HEAD

FAST = ["--model", "tiny-random", "--device", "cpu", "--patch-mm", "30", "--slice-step-mm", "5", "-q",
        "--patterns", "honeycombing,emphysema"]


@pytest.fixture(scope="module")
def two_scans(tmp_path_factory, small_phantom):
    folder = tmp_path_factory.mktemp("scans")
    paths = [folder / "a" / "chest.nii.gz", folder / "b" / "chest.nii.gz"]
    for p in paths:
        p.parent.mkdir()
        small_phantom.save(p)
    return paths


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_summary_has_one_row_per_scan(two_scans, tmp_path, capsys):
    out = tmp_path / "cohort"
    assert main(["analyze", *map(str, two_scans), "-o", str(out), *FAST, "--prompt", "interstitial lung disease",
                 "--prompt", "honeycombing"]) == 0
    rows = read_rows(out / "summary.csv")
    assert [r["folder"] for r in rows] == ["a_chest", "b_chest"]
    assert [r["input"] for r in rows] == [str(p) for p in two_scans]
    header = list(rows[0])
    assert tuple(header[:len(SUMMARY_HEAD)]) == SUMMARY_HEAD
    for r, folder in zip(rows, ("a_chest", "b_chest")):
        doc = validate_result(out / folder / "result.json")
        assert float(r["lung_volume_ml"]) == pytest.approx(doc["lung_volume_ml"], abs=0.05)
        p_ild = doc["probabilities"]["interstitial lung disease"]
        assert float(r["p[interstitial lung disease]"]) == pytest.approx(p_ild, abs=1e-4)
        ext = doc["extent"]["honeycombing"]
        # Extent in percent, as the report shows it, with the unit in the column name.
        assert float(r["extent_pct[honeycombing]"]) == pytest.approx(100 * ext["lung_fraction"], abs=0.01)
        positive_ml = ext["positive_ml"]["left"] + ext["positive_ml"]["right"]
        assert float(r["extent_ml[honeycombing]"]) == pytest.approx(positive_ml, abs=0.1)
        for zone in ("upper", "lower", "left", "right", "subpleural", "central"):
            want = ext["by_zone"][zone]
            assert (r[f"extent_pct[honeycombing].{zone}"] == "") if want is None else \
                float(r[f"extent_pct[honeycombing].{zone}"]) == pytest.approx(100 * want, abs=0.01)
        assert r["extent[honeycombing].predominance"] == ext["predominance"]
        assert "pattern_pct[emphysema]" in r
        # The notes' text, each note once, in order.
        assert r["notes"].split(" | ") == [" ".join(n.split()) for n in doc["notes"]]
        assert not any(c.startswith("extent[") and not c.endswith((".predominance", ".calibrated")) for c in r)
        assert "model-not-meaningful" in r["flags"].split(";")
    # nothing else of ours lies beside the folders (no partial files)
    assert sorted(p.name for p in out.iterdir()) == ["a_chest", "b_chest", "summary.csv"]
    assert "cohort summary:" in capsys.readouterr().out
    # a second run replaces the tool's own summary
    assert main(["analyze", *map(str, two_scans), "-o", str(out), *FAST]) == 0
    assert len(read_rows(out / "summary.csv")) == 2


def test_foreign_summary_is_refused_before_any_work(two_scans, tmp_path, capsys):
    out = tmp_path / "cohort"
    out.mkdir()
    (out / "summary.csv").write_text("patient,score\nx,1\n", encoding="utf-8")
    assert main(["analyze", *map(str, two_scans), "-o", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "summary.csv" in err and "not written by zeroshot-ild" in err and len(err.strip().splitlines()) == 1
    assert (out / "summary.csv").read_text(encoding="utf-8") == "patient,score\nx,1\n"
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv"]  # no scan was analysed
    assert main(["analyze", *map(str, two_scans), "-o", str(out), *FAST, "--overwrite"]) == 0
    assert len(read_rows(out / "summary.csv")) == 2


def test_a_folder_in_the_way_is_refused(two_scans, tmp_path, capsys):
    out = tmp_path / "cohort"
    (out / "summary.csv").mkdir(parents=True)
    assert main(["analyze", *map(str, two_scans), "-o", str(out), *FAST, "--overwrite"]) == 2
    assert "in the way" in capsys.readouterr().err


def test_one_scan_writes_no_summary(two_scans, tmp_path, capsys):
    out = tmp_path / "one"
    assert main(["analyze", str(two_scans[0]), "-o", str(out), *FAST]) == 0
    assert not (out / "summary.csv").exists()


def test_a_scan_named_like_the_summary_is_refused(small_phantom, tmp_path, capsys):
    paths = [tmp_path / "summary.csv.nii.gz", tmp_path / "other.nii.gz"]
    for p in paths:
        small_phantom.save(p)
    assert main(["analyze", *map(str, paths), "-o", str(tmp_path / "out"), *FAST]) == 2
    assert "rename" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_broken_scan_in_a_batch_is_reported_and_the_rest_analysed(two_scans, tmp_path, capsys):
    """A cohort run does not stop at a damaged file: the others are analysed, the failure is one line on
    stderr and a row of summary.csv, no folder is written for it, and the exit code says a scan failed."""
    broken = tmp_path / "broken" / "chest.nii.gz"
    broken.parent.mkdir()
    broken.write_bytes(two_scans[0].read_bytes()[:2000])  # truncated download
    out = tmp_path / "cohort"
    code = main(["analyze", str(two_scans[0]), str(broken), str(two_scans[1]), "-o", str(out), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_PARTIAL  # finished, but not every scan: the same code as zeroshot-ild-train's
    assert len(err) == 2 and str(broken) in err[0] and "1 of 3 scans failed" in err[1]
    rows = read_rows(out / "summary.csv")
    assert [r["input"] for r in rows] == [str(two_scans[0]), str(broken), str(two_scans[1])]
    assert rows[1]["error"] and not rows[1]["model"] and rows[0]["error"] == rows[2]["error"] == ""
    assert tuple(list(rows[0])[:len(SUMMARY_HEAD)]) == SUMMARY_HEAD  # still recognised as ours next time
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(folders) == 2 and all((out / f / "result.json").is_file() for f in folders)
