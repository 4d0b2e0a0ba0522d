"""--out never loses a user's file: manifest, refusals before the work, atomic files, leftovers, full disk, NaN."""
import errno
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from ZeroShotILDLib import outputs
from ZeroShotILDLib.cli import main, output_names
from ZeroShotILDLib.outputs import MANIFEST_NAME, OUTPUT_FILES

FAST = ["--model", "tiny-random", "--device", "cpu", "--patch-mm", "30", "--slice-step-mm", "5", "-q"]


def validate_result(path):
    """Every result.json a test writes must be strict JSON and valid against the shipped schema."""
    import jsonschema

    text = path.read_text(encoding="utf-8")
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"{path} holds bare {c}: not JSON"))
    schema = json.loads(outputs.RESULT_SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(doc)
    return doc


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(err):
    lines = [line for line in err.strip().splitlines() if line]
    return len(lines) == 1 and lines[0].startswith("zeroshot-ild: error:") and "Traceback" not in err


@pytest.fixture(scope="module")
def phantom_file(tmp_path_factory, small_phantom):
    path = tmp_path_factory.mktemp("scan") / "chest.nii.gz"
    small_phantom.save(path)
    return path


@pytest.fixture(scope="module")
def small_result(small_scan):
    from ZeroShotILDLib.pipeline import analyze
    from ZeroShotILDLib.settings import AnalysisSettings

    settings = AnalysisSettings(model="tiny-random", device="cpu", patch_mm=30, slice_step_mm=5).validate()
    return analyze(small_scan, settings)


@pytest.fixture
def no_analysis(monkeypatch):
    """Fail the test if the analysis starts: refusals must come before any work."""
    from ZeroShotILDLib import pipeline

    def boom(*a, **k):
        raise AssertionError("the analysis ran although the output place was refused")

    monkeypatch.setattr(pipeline.Analyzer, "analyze", boom)


# -------------------------------------------------------------------------------------------------
# What is replaced, what is left alone
# -------------------------------------------------------------------------------------------------
def test_rerun_into_earlier_result_keeps_the_users_files(small_result, small_scan, tmp_path):
    out = tmp_path / "res"
    outputs.write_outputs(small_result, small_scan, out)
    manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    # Optional outputs (DICOM results, report.pdf) depend on the input and the installed extras.
    assert sorted(n for n in manifest["files"] if n not in outputs.OPTIONAL_OUTPUT_FILES) == sorted(OUTPUT_FILES)
    assert all(len(r["sha256"]) == 64 and r["size"] == (out / n).stat().st_size for n, r in manifest["files"].items())
    (out / "annotations.txt").write_text("radiologist notes", encoding="utf-8")
    (out / "review").mkdir()
    (out / "review" / "slice12.png").write_bytes(b"x")
    outputs.write_outputs(small_result, small_scan, out)
    assert (out / "annotations.txt").read_text(encoding="utf-8") == "radiologist notes"
    assert (out / "review" / "slice12.png").read_bytes() == b"x"
    validate_result(out / "result.json")
    assert not [p for p in out.iterdir() if p.name.startswith(outputs.STAGING_PREFIX)]


def test_earlier_result_whose_files_changed_is_refused_as_foreign(small_result, small_scan, tmp_path):
    out = tmp_path / "res"
    outputs.write_outputs(small_result, small_scan, out)
    (out / "result.json").write_text("{}", encoding="utf-8")  # edited by someone: no longer what we wrote
    with pytest.raises(outputs.InputError, match="result.json does not match"):
        outputs.write_outputs(small_result, small_scan, out)
    assert (out / "result.json").read_text(encoding="utf-8") == "{}"


def test_pre_manifest_result_folder_is_refused_unless_overwrite_and_never_replaced_whole(small_result, small_scan,
                                                                                         tmp_path):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "result.json").write_text(json.dumps({"schema": outputs.RESULT_SCHEMA}), encoding="utf-8")
    (out / "thesis.tex").write_text("chapter 1", encoding="utf-8")
    (out / "chest.nii.gz").write_bytes(b"the input scan")
    with pytest.raises(outputs.InputError, match="no manifest"):
        outputs.write_outputs(small_result, small_scan, out)
    outputs.write_outputs(small_result, small_scan, out, overwrite=True)
    assert (out / "thesis.tex").read_text(encoding="utf-8") == "chapter 1"
    assert (out / "chest.nii.gz").read_bytes() == b"the input scan"
    validate_result(out / "result.json")


def test_a_manifest_naming_other_files_makes_the_folder_foreign(small_result, small_scan, tmp_path):
    out = tmp_path / "res"
    outputs.write_outputs(small_result, small_scan, out)
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    doc = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    doc["files"]["notes.txt"] = {"size": 4, "sha256": "0" * 64}
    (out / MANIFEST_NAME).write_text(json.dumps(doc), encoding="utf-8")
    for overwrite in (False, True):
        try:
            outputs.write_outputs(dataclasses_replace_notes(small_result), small_scan, out, overwrite=overwrite)
        except outputs.InputError as exc:
            assert not overwrite and "notes.txt" in str(exc)
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"


def dataclasses_replace_notes(result):
    import dataclasses

    return dataclasses.replace(result, notes=list(result.notes) + ["again"])


def test_foreign_folder_is_refused_before_any_work(phantom_file, tmp_path, capsys, no_analysis):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious", encoding="utf-8")
    (out / "result.json").write_text('{"my": "own result.json"}', encoding="utf-8")
    code, _, err = _run(["analyze", str(phantom_file), "-o", str(out), *FAST], capsys)
    assert code == 2 and _one_line_error(err) and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["result.json", "thesis.tex"]
    assert (out / "result.json").read_text(encoding="utf-8") == '{"my": "own result.json"}'


def test_overwrite_writes_only_our_names(phantom_file, tmp_path, capsys):
    out = tmp_path / "patA"
    out.mkdir()
    (out / "chest.nii.gz").write_bytes(b"the input")
    (out / "review").mkdir()
    code, stdout, err = _run(["analyze", str(phantom_file), "-o", str(out), "--overwrite", *FAST], capsys)
    assert code == 0, err
    assert (out / "chest.nii.gz").read_bytes() == b"the input" and (out / "review").is_dir()
    assert sorted(p.name for p in out.iterdir() if p.name not in outputs.OPTIONAL_OUTPUT_FILES) == \
        sorted(["chest.nii.gz", "review", MANIFEST_NAME, *OUTPUT_FILES])
    validate_result(out / "result.json")


def test_output_name_taken_by_a_folder_is_refused(phantom_file, tmp_path, capsys, no_analysis):
    out = tmp_path / "o"
    (out / "result.json").mkdir(parents=True)
    (out / "result.json" / "keep.txt").write_text("x", encoding="utf-8")
    code, _, err = _run(["analyze", str(phantom_file), "-o", str(out), "--overwrite", *FAST], capsys)
    assert code == 2 and _one_line_error(err) and (out / "result.json" / "keep.txt").is_file()


def test_interrupted_move_leaves_each_file_old_or_new_and_the_manifest_covers_all(small_result, small_scan,
                                                                                  tmp_path, monkeypatch):
    import dataclasses

    out = outputs.write_outputs(small_result, small_scan, tmp_path / "res")
    old = {name: (out / name).read_bytes() for name in OUTPUT_FILES}
    moved = []
    real_replace = os.replace

    def replace_then_die(src, dst):
        if str(src).startswith(str(out / outputs.STAGING_PREFIX)) and len(moved) == 3:
            raise KeyboardInterrupt  # the user's Ctrl-C between two renames
        real_replace(src, dst)
        moved.append(os.path.basename(dst))

    monkeypatch.setattr(outputs.os, "replace", replace_then_die)
    other = dataclasses.replace(small_result, notes=["second run"])
    with pytest.raises(KeyboardInterrupt):
        outputs.write_outputs(other, small_scan, out)
    monkeypatch.undo()
    new_json = json.loads((out / "result.json").read_text(encoding="utf-8"))
    assert "second run" not in new_json["notes"]  # result.json moves last: still the old, complete one
    for name in OUTPUT_FILES:
        data = (out / name).read_bytes()
        assert data == old[name] or name in moved[1:], name  # old, or the new one renamed in whole
    assert set(json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))["files"]) >= set(OUTPUT_FILES)
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != MANIFEST_NAME]


# -------------------------------------------------------------------------------------------------
# Batches with equal file names
# -------------------------------------------------------------------------------------------------
def test_output_names_are_unique_and_predictable():
    assert output_names(["/d/patA/chest.nii.gz", "/d/patB/chest.nii.gz", "/d/x.nrrd"]) == \
        ["patA_chest", "patB_chest", "x"]
    assert output_names(["/a/s/ct.nii", "/b/s/ct.nii"]) == ["a_s_ct", "b_s_ct"]
    assert output_names(["/d/patA/series/", "/d/patB/series"]) == ["patA_series", "patB_series"]
    assert output_names(["/d/a.nii.gz", "/d/a.nii.gz"]) == ["a", "a-2"]
    assert output_names(["/d/Chest.nii.gz", "/e/chest.nii.gz"]) == ["d_Chest", "e_chest"]
    assert output_names([".."])[0] not in ("..", ".", "")


def test_batch_with_equal_file_names_keeps_both(small_phantom, tmp_path, capsys):
    for pat in ("patA", "patB"):
        (tmp_path / pat).mkdir()
        small_phantom.save(tmp_path / pat / "chest.nii.gz")
    out = tmp_path / "batch"
    code, stdout, err = _run(["analyze", str(tmp_path / "patA" / "chest.nii.gz"), str(tmp_path / "patB" / "chest.nii.gz"),
                              "-o", str(out), *FAST], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["patA_chest", "patB_chest", "summary.csv"]
    for pat in ("patA", "patB"):
        doc = validate_result(out / f"{pat}_chest" / "result.json")
        assert doc["input"].endswith(f"{pat}/chest.nii.gz")
        assert f"{tmp_path / pat / 'chest.nii.gz'} -> {out / (pat + '_chest')}" in stdout


def test_batch_checks_every_output_place_before_the_first_scan(phantom_file, tmp_path, capsys, no_analysis):
    out = tmp_path / "batch"
    (out / "b").mkdir(parents=True)
    (out / "b" / "mine.txt").write_text("x", encoding="utf-8")
    other = tmp_path / "b.nii.gz"
    other.write_bytes(phantom_file.read_bytes())
    code, _, err = _run(["analyze", str(phantom_file), str(other), "-o", str(out), *FAST], capsys)
    assert code == 2 and _one_line_error(err) and not (out / "chest").exists()


# -------------------------------------------------------------------------------------------------
# Leftovers of killed runs, permissions
# -------------------------------------------------------------------------------------------------
def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_runs_are_cleaned_but_never_a_users_folder(small_result, small_scan, tmp_path,
                                                                       monkeypatch):
    from ZeroShotILDLib import atomic_files

    out = tmp_path / "res"
    out.mkdir()
    dead = _dead_pid()
    # A staging folder of a killed run of ours (made by our own function, under a dead pid).
    monkeypatch.setattr(atomic_files.os, "getpid", lambda: dead)
    staging = atomic_files.make_staging_dir(out, outputs.STAGING_PREFIX)
    kept = atomic_files.make_staging_dir(out, outputs.STAGING_PREFIX)  # ours, but a user put a file in it
    monkeypatch.undo()
    (staging / "heatmap.nii.gz").write_bytes(b"half")
    (kept / "result.json").write_bytes(b"half")
    (kept / "thesis.tex").write_text("x", encoding="utf-8")
    # Beside --out: earlier versions' names are never ours to clean any more.
    legacy_old = tmp_path / f".res.old-{dead}"
    legacy_old.mkdir()
    (legacy_old / "result.json").write_text("{}", encoding="utf-8")
    outputs.write_outputs(small_result, small_scan, out, overwrite=True)
    assert not staging.exists()
    assert (kept / "thesis.tex").is_file() and not (kept / "result.json").exists()
    assert (legacy_old / "result.json").is_file()


def test_result_folder_and_files_follow_the_umask(small_result, small_scan, tmp_path):
    old = os.umask(0o022)
    try:
        out = outputs.write_outputs(small_result, small_scan, tmp_path / "shared" / "res")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for name in OUTPUT_FILES + (MANIFEST_NAME,):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


def test_out_under_a_file_is_refused_before_any_work(phantom_file, tmp_path, capsys, no_analysis):
    blocker = tmp_path / "afile"
    blocker.write_text("x", encoding="utf-8")
    code, _, err = _run(["analyze", str(phantom_file), "-o", str(blocker / "sub" / "out"), *FAST], capsys)
    assert code == 2 and _one_line_error(err) and "not a folder" in err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc, where nobody (not even root) can create files")
def test_unwritable_out_is_refused_before_any_work(phantom_file, capsys, no_analysis):
    code, _, err = _run(["analyze", str(phantom_file), "-o", "/proc/zeroshot-ild-test-out", *FAST], capsys)
    assert code == 2 and _one_line_error(err) and "cannot write" in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_parent_is_refused_before_any_work(phantom_file, tmp_path, capsys, no_analysis):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        code, _, err = _run(["analyze", str(phantom_file), "-o", str(parent / "out"), *FAST], capsys)
    finally:
        parent.chmod(0o755)
    assert code == 2 and _one_line_error(err) and "cannot write" in err


@pytest.mark.parametrize("when", ["first run", "re-run"])
def test_full_disk_one_line_and_nothing_half_written(phantom_file, tmp_path, capsys, monkeypatch, when):
    out = tmp_path / "res"
    if when == "re-run":
        code, _, err = _run(["analyze", str(phantom_file), "-o", str(out), *FAST], capsys)
        assert code == 0, err
        (out / "annotations.txt").write_text("mine", encoding="utf-8")
        before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("SimpleITK.WriteImage", full)
    code, _, err = _run(["analyze", str(phantom_file), "-o", str(out), "--prompt", "honeycombing", *FAST], capsys)
    assert code == 2 and _one_line_error(err) and "disk is full" in err
    if when == "first run":
        assert not out.exists()
    else:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.rglob(f"{outputs.STAGING_PREFIX}*")) and not list(tmp_path.rglob("*.partial"))


# -------------------------------------------------------------------------------------------------
# result.json is strict JSON
# -------------------------------------------------------------------------------------------------
def test_non_finite_numbers_become_null_with_a_note(small_result, small_scan, tmp_path):
    import dataclasses

    bad = dataclasses.replace(small_result, finding_probabilities={k: float("nan") for k in small_result.finding_probabilities},
                              lung_volume_ml=float("inf"), notes=list(small_result.notes))
    out = outputs.write_outputs(bad, small_scan, tmp_path / "nan")
    text = (out / "result.json").read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    doc = validate_result(out / "result.json")
    assert doc["lung_volume_ml"] is None and all(v is None for v in doc["probabilities"].values())
    assert any("non-finite" in n for n in doc["notes"])


def test_json_text_refuses_nothing_and_writes_no_nan():
    text = outputs.json_text({"a": [1.0, float("-inf"), np.float32("nan")], "b": np.int64(3), "notes": []})
    assert json.loads(text) == {"a": [1.0, None, None], "b": 3, "notes": [text and json.loads(text)["notes"][0]]}
    assert "2 non-finite" in json.loads(text)["notes"][0]
