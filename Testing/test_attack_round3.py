"""Issue 25 (never lose a user's file, round 3): every hostile case of scripts/attack_check.py as a test,
plus unit tests of the pieces (CSV writer, config values, padding, lung labels, training --out)."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

_spec = importlib.util.spec_from_file_location("attack_check", REPO / "scripts" / "attack_check.py")
attack_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(attack_check)


@pytest.mark.parametrize("name", [c[0] for c in attack_check.CASES])
def test_attack_case(name, tmp_path):
    fn = next(c[3] for c in attack_check.CASES if c[0] == name)
    try:
        fn(tmp_path)
    except attack_check.Skip as exc:
        pytest.skip(str(exc))


# -------------------------------------------------------------------------------------------------
# CSV: formula cells neutralised, numbers untouched, round trip
# -------------------------------------------------------------------------------------------------
def test_csv_cells_are_neutralised_but_numbers_stay_numbers(tmp_path):
    import csv

    from ZeroShotILDLib import csv_files

    assert csv_files.neutralise("=1+1") == "'=1+1"
    assert csv_files.neutralise("@x") == "'@x" and csv_files.neutralise("\tx") == "'\tx"
    assert csv_files.neutralise("-1+1") == "'-1+1" and csv_files.neutralise("+cmd") == "'+cmd"
    for number in ("-0.25", "-3e-05", "+4", "-12", ".5"):
        assert csv_files.neutralise(number) == number
    assert csv_files.neutralise(-0.25) == -0.25 and csv_files.neutralise(None) is None
    path = tmp_path / "t.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        w = csv_files.DictWriter(handle, fieldnames=["=head", "v"])
        w.writeheader()
        w.writerow({"=head": "=HYPERLINK(\"x\")", "v": -1.5})
    raw = list(csv.reader(open(path, newline="", encoding="utf-8")))
    assert raw == [["'=head", "v"], ["'=HYPERLINK(\"x\")", "-1.5"]]
    back = list(csv_files.DictReader(open(path, newline="", encoding="utf-8")))
    assert back == [{"=head": "=HYPERLINK(\"x\")", "v": "-1.5"}]


def test_every_csv_writer_of_the_project_goes_through_csv_files():
    offenders = []
    for folder in ("ZeroShotILDLib", "training", "ZeroShotILD"):
        for path in (REPO / folder).rglob("*.py"):
            if path.name == "csv_files.py":
                continue
            text = path.read_text(encoding="utf-8")
            if "csv.writer(" in text or "csv.DictWriter(" in text:
                offenders.append(str(path.relative_to(REPO)))
    assert not offenders, offenders


# -------------------------------------------------------------------------------------------------
# --config values and --seed
# -------------------------------------------------------------------------------------------------
def test_config_value_checks_types_against_the_option():
    import argparse

    from ZeroShotILDLib.errors import InputError
    from ZeroShotILDLib.settings import config_value

    p = argparse.ArgumentParser()
    seed = p.add_argument("--seed", type=int)
    quiet = p.add_argument("--quiet", action="store_true")
    window = p.add_argument("--hu-window", nargs=2, type=float)
    device = p.add_argument("--device", choices=["cpu", "cuda"])
    prompt = p.add_argument("--prompt", action="append")
    assert config_value("seed", 3, seed) == 3 and config_value("seed", "4", seed) == 4
    assert config_value("quiet", True, quiet) is True and config_value("seed", None, seed) is None
    assert config_value("hu-window", [-1000, 200], window) == [-1000.0, 200.0]
    assert config_value("prompt", "honeycombing", prompt) == ["honeycombing"]
    for key, value, action in (("seed", [1], seed), ("seed", {"a": 1}, seed), ("seed", True, seed),
                               ("seed", "1.5", seed), ("quiet", "yes", quiet), ("hu-window", [1], window),
                               ("device", "tpu", device), ("prompt", [["a"]], prompt), ("prompt", {"a": 1}, prompt)):
        with pytest.raises(InputError) as info:
            config_value(key, value, action)
        assert key in str(info.value) and "\n" not in str(info.value)


def test_print_config_output_is_accepted_as_config(tmp_path, capsys):
    from training.cli import main

    assert main(["evaluate", "m.csv", "--out", str(tmp_path / "o"), "--print-config"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "c.yaml").write_text(text, encoding="utf-8")
    assert main(["evaluate", "m.csv", "--out", str(tmp_path / "o"), "--config", str(tmp_path / "c.yaml"),
                 "--print-config"]) == 0
    assert capsys.readouterr().out == text


# -------------------------------------------------------------------------------------------------
# Padding recognised as the field of view's edge
# -------------------------------------------------------------------------------------------------
def test_padding_bands_found_per_side_and_not_in_noisy_air():
    from ZeroShotILDLib.scan_padding import find_padding

    rng = np.random.default_rng(0)
    hu = rng.normal(-1000, 20, size=(4, 40, 50)).astype(np.int16)  # noisy air: no padding
    assert find_padding(hu) is None
    padded = np.pad(hu, ((1, 0), (3, 2), (0, 5)), constant_values=-1024)
    pad = find_padding(padded)
    assert pad is not None and pad.box == (1, 5, 3, 43, 0, 50) and not pad.bands.any()


def test_lung_labels_parse_and_refuse_in_one_line():
    from ZeroShotILDLib.errors import InputError
    from ZeroShotILDLib.lung_labels import lung_mask_from_labels, parse_lung_labels

    assert parse_lung_labels("2, 1,2") == (1, 2) and parse_lung_labels(None) is None
    for bad in ("a", "0", ",", "1.5"):
        with pytest.raises(InputError):
            parse_lung_labels(bad)
    labels = np.array([[[0, 1, 2, 3]]])
    with pytest.raises(InputError, match=r"3 values \(1, 2, 3\)"):
        lung_mask_from_labels(labels)
    with pytest.raises(InputError, match="none of --lung-labels 7"):
        lung_mask_from_labels(labels, (7,))
    assert lung_mask_from_labels(labels, (2, 3)).tolist() == [[[False, False, True, True]]]
    assert lung_mask_from_labels(np.array([[[0, 5, 5]]])).tolist() == [[[False, True, True]]]


# -------------------------------------------------------------------------------------------------
# Training --out: own folders resumable after a kill, forged manifests refused
# -------------------------------------------------------------------------------------------------
def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_training_out_is_ours_after_a_run_and_foreign_when_edited_or_forged(tmp_path):
    from training import files

    from ZeroShotILDLib.errors import InputError

    out = tmp_path / "run"
    files.claim_out_dir(out, "test")
    (out / "metrics.csv").write_text("step\n1\n", encoding="utf-8")
    files.finish(out)
    doc = json.loads((out / files.TRAIN_MANIFEST).read_text(encoding="utf-8"))
    assert set(doc["files"]) == {"metrics.csv"} and "running" not in doc
    files.claim_out_dir(out, "test")  # ours: accepted
    files.finish(out)
    (out / "metrics.csv").write_text("edited", encoding="utf-8")
    with pytest.raises(InputError, match="metrics.csv does not match"):
        files.claim_out_dir(out, "test")
    # A killed run (manifest marked running, its process gone) may have changed its files.
    doc = json.loads((out / files.TRAIN_MANIFEST).read_text(encoding="utf-8"))
    (out / files.TRAIN_MANIFEST).write_text(json.dumps(dict(doc, running={"pid": _dead_pid()})), encoding="utf-8")
    files.claim_out_dir(out, "test")
    files.finish(out)
    forged = tmp_path / "thesis"
    forged.mkdir()
    (forged / "thesis.tex").write_text("x", encoding="utf-8")
    (forged / files.TRAIN_MANIFEST).write_text(json.dumps({"format": files.MANIFEST_FORMAT,
                                                           "files": {"../x": {"size": 1}}}), encoding="utf-8")
    with pytest.raises(InputError, match="not a file inside"):
        files.claim_out_dir(forged, "test")
    (forged / files.TRAIN_MANIFEST).write_text(json.dumps({"format": files.MANIFEST_FORMAT, "files": {}}),
                                               encoding="utf-8")
    with pytest.raises(InputError):
        files.claim_out_dir(forged, "test")


def test_a_failed_training_command_leaves_no_new_folder(tmp_path):
    from training import files

    out = tmp_path / "new"
    files.claim_out_dir(out, "test")
    files.finish(out)
    assert not out.exists()


def test_export_replaces_only_an_engine_checkpoint(tmp_path):
    from training.files import check_export_target

    from ZeroShotILDLib.errors import InputError

    mine = tmp_path / "model.safetensors"
    mine.write_bytes(b"not a checkpoint of ours")
    with pytest.raises(InputError):
        check_export_target(mine)
    assert check_export_target(tmp_path / "new.safetensors") == tmp_path / "new.safetensors"
    os.symlink(mine, tmp_path / "link.safetensors")
    with pytest.raises(InputError, match="not a plain file"):
        check_export_target(tmp_path / "link.safetensors")
