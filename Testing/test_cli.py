"""End-to-end command line: outputs, schema, bad inputs (one line, non-zero exit, nothing left behind)."""
import csv

import numpy as np
import pytest

from conftest import REPO, shared_data
from test_outputs_safety import validate_result
from ZeroShotILDLib.cli import main

FAST = ["--model", "tiny-random", "--device", "cpu", "--patch-mm", "30", "--slice-step-mm", "5", "-q"]


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def phantom_file(tmp_path_factory, small_phantom):
    path = tmp_path_factory.mktemp("scan") / "phantom.nii.gz"
    small_phantom.save(path)
    return path


def test_analyze_writes_every_output(phantom_file, tmp_path, capsys):
    import SimpleITK as sitk

    out = tmp_path / "result"
    code, stdout, err = _run(["-q", "analyze", str(phantom_file), "--out", str(out), *FAST[:-1],
                              "--prompt", "interstitial lung disease", "--prompt", "honeycombing",
                              "--subtypes", "idiopathic pulmonary fibrosis,sarcoidosis", "--top-k", "5"], capsys)
    assert code == 0, err
    for name in ("result.json", "patches.csv", "montage.png", "heatmap.nii.gz", "lung_mask.nii.gz", "overlay.png"):
        assert (out / name).is_file(), name
    doc = validate_result(out / "result.json")
    assert doc["schema"] == "zeroshot-ild-result/1"
    assert set(doc["probabilities"]) == {"interstitial lung disease", "honeycombing"}
    assert set(doc["subtype_probabilities"]) == {"idiopathic pulmonary fibrosis", "sarcoidosis"}
    assert len(doc["top_patches"]) == 5 and doc["top_patches"][0]["rank"] == 1
    assert doc["lung_volume_ml"] > 100 and doc["model"]["meaningful"] is False
    with open(out / "patches.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == doc["candidates"]
    assert rows[0]["rank"] == "1"
    top = doc["top_patches"][0]
    assert int(rows[0]["slice_index"]) == top["slice_index"]
    assert [float(rows[0][k]) for k in ("center_r_mm", "center_a_mm", "center_s_mm")] == pytest.approx(top["center_ras_mm"], abs=1e-3)
    ref = sitk.ReadImage(str(phantom_file))
    for name in ("heatmap.nii.gz", "lung_mask.nii.gz"):
        img = sitk.ReadImage(str(out / name))
        assert img.GetSize() == ref.GetSize()
        np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing())
        np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin())
        np.testing.assert_allclose(img.GetDirection(), ref.GetDirection())
    heat = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "heatmap.nii.gz")))
    z, y0, x0 = top["slice_index"], top["bbox_voxels"]["y0"], top["bbox_voxels"]["x0"]
    assert heat[z, y0, x0] == pytest.approx(top["probabilities"]["interstitial lung disease"], abs=1e-6)
    assert "P(interstitial lung disease)" in stdout


@pytest.mark.parametrize("content,suffix,reason", [
    (b"\x89PNG\r\n\x1a\n" + b"0" * 100, ".png", "not a CT"),
    (b"", ".nii.gz", ""),
    (b"hello", ".txt", ""),
])
def test_bad_files_fail_with_one_line_and_no_output(tmp_path, capsys, content, suffix, reason):
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(content)
    out = tmp_path / "out"
    code, _, err = _run(["analyze", str(bad), "--out", str(out), *FAST], capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("zeroshot-ild: error:"), err
    assert "Traceback" not in err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_mr_like_volume_is_refused(tmp_path, capsys):
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    mr = sitk.GetImageFromArray(rng.integers(0, 3000, size=(20, 64, 64)).astype(np.int16))
    path = tmp_path / "t1.nii.gz"
    sitk.WriteImage(mr, str(path))
    code, _, err = _run(["analyze", str(path), "--out", str(tmp_path / "o"), *FAST], capsys)
    assert code == 2 and "error" in err and len(err.strip().splitlines()) == 1


def test_scan_without_lungs_is_refused(tmp_path, capsys):
    import SimpleITK as sitk

    body = np.full((20, 64, 64), -1000, np.int16)
    yy, xx = np.mgrid[:64, :64]
    body[:, (yy - 32) ** 2 + (xx - 32) ** 2 < 28 ** 2] = 40  # a solid soft-tissue cylinder: no air inside
    img = sitk.GetImageFromArray(body)
    img.SetSpacing((2.0, 2.0, 5.0))
    path = tmp_path / "nolungs.nii.gz"
    sitk.WriteImage(img, str(path))
    code, _, err = _run(["analyze", str(path), "--out", str(tmp_path / "o"), *FAST], capsys)
    assert code == 2 and "lung" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_empty_prompt_and_bad_checkpoint(phantom_file, tmp_path, capsys):
    code, _, err = _run(["analyze", str(phantom_file), "--out", str(tmp_path / "o"), *FAST, "--prompt", " "], capsys)
    assert code == 2 and "empty prompt" in err
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = _run(["analyze", str(phantom_file), "--out", str(tmp_path / "o"), *FAST, "--checkpoint", str(bad)],
                        capsys)
    assert code == 2 and "checkpoint" in err and len(err.strip().splitlines()) == 1


def test_non_empty_foreign_out_dir_is_refused(phantom_file, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.docx").write_text("precious", encoding="utf-8")
    code, _, err = _run(["analyze", str(phantom_file), "--out", str(out), *FAST], capsys)
    assert code == 2 and (out / "thesis.docx").read_text(encoding="utf-8") == "precious"


def test_demo_runs_offline(tmp_path, capsys):
    code, stdout, err = _run(["demo", "--out", str(tmp_path / "demo"), "--shape", "40", "96", "96",
                              "--model", "tiny-random", "--slice-step-mm", "5", "-q"], capsys)
    assert code == 0, err
    assert (tmp_path / "demo" / "montage.png").is_file() and (tmp_path / "demo" / "overlay.png").is_file()
    assert "meaningless" in err
    validate_result(tmp_path / "demo" / "result.json")


def test_version(capsys):
    from ZeroShotILDLib import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"zeroshot-ild {__version__}"


def _mask_file(phantom_file, path, *, shift_origin=0.0, shape=None):
    """The phantom's own lung mask, saved as a TotalSegmentator-like label file (1 = left, 2 = right)."""
    import SimpleITK as sitk

    from ZeroShotILDLib.lung_mask import segment_lungs
    from ZeroShotILDLib.scan import read_scan

    scan = read_scan(phantom_file)
    mask = segment_lungs(scan.hu, scan.spacing_mm).astype(np.uint8)
    mask[:, :, : mask.shape[2] // 2] *= 2
    mask[mask.shape[0] * 2 // 3:] = 0  # unlike the engine's own mask, so using the file shows
    if shape is not None:
        mask = mask[: shape[0]]
    img = sitk.GetImageFromArray(mask)
    img.SetSpacing(scan.spacing_mm)
    img.SetOrigin(tuple(v + shift_origin for v in scan.origin_mm))
    img.SetDirection(scan.direction)
    sitk.WriteImage(img, str(path))
    return int((mask > 0).sum())


def test_lung_mask_file_is_used_and_grid_checked(phantom_file, tmp_path, capsys):
    import SimpleITK as sitk

    voxels = _mask_file(phantom_file, tmp_path / "lungs.nii.gz")
    out = tmp_path / "o"
    # A label map (1, 2) is not taken whole without being told which values are lung (issue 25).
    code, _, err = _run(["analyze", str(phantom_file), "-o", str(out), "--lung-mask", str(tmp_path / "lungs.nii.gz"),
                         *FAST], capsys)
    assert code == 2 and "(1, 2)" in err and "--lung-labels" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(["analyze", str(phantom_file), "-o", str(out), "--lung-mask", str(tmp_path / "lungs.nii.gz"),
                         "--lung-labels", "1,2", *FAST], capsys)
    assert code == 0, err
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "lung_mask.nii.gz")))
    assert int(written.sum()) == voxels and written.max() == 1
    assert any("lung mask read from lungs.nii.gz" in n for n in validate_result(out / "result.json")["notes"])
    _mask_file(phantom_file, tmp_path / "moved.nii.gz", shift_origin=12.5)
    code, _, err = _run(["analyze", str(phantom_file), "-o", str(tmp_path / "o2"), "--lung-mask",
                         str(tmp_path / "moved.nii.gz"), *FAST], capsys)
    assert code == 2 and "not on the scan's grid" in err and "origin" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o2").exists()
    _mask_file(phantom_file, tmp_path / "short.nii.gz", shape=(10,))
    code, _, err = _run(["analyze", str(phantom_file), "-o", str(tmp_path / "o3"), "--lung-mask",
                         str(tmp_path / "short.nii.gz"), *FAST], capsys)
    assert code == 2 and "size" in err and len(err.strip().splitlines()) == 1


def test_lung_mask_count_must_match_the_scans(phantom_file, tmp_path, capsys):
    code, _, err = _run(["analyze", str(phantom_file), str(phantom_file), "-o", str(tmp_path / "o"),
                         "--lung-mask", str(tmp_path / "lungs.nii.gz"), *FAST], capsys)
    assert code == 2 and "one --lung-mask per scan" in err and not (tmp_path / "o").exists()


REAL_CTS = ["totalseg/chest_crop_a.nii.gz", "totalseg/chest_crop_b.nii.gz", "totalseg/abdomen_lung_bases.nii.gz",
            "totalseg/abdomen_dicom_series", "lidc_slices", "osic_ipf_sparse"]


@pytest.mark.parametrize("name", REAL_CTS)
def test_analyze_real_ct(name, tmp_path, capsys):
    path = shared_data("real", "ct", name)
    out = tmp_path / "o"
    code, _, err = _run(["analyze", str(path), "--out", str(out), *FAST, "--filter-threshold", "0.2"], capsys)
    if code == 2:
        # Only a clear refusal of a scan with too little lung is acceptable, never a crash.
        assert name in ("totalseg/abdomen_lung_bases.nii.gz", "totalseg/abdomen_dicom_series"), err
        assert "lung" in err and len(err.strip().splitlines()) == 1
        return
    assert code == 0, err
    doc = validate_result(out / "result.json")
    assert doc["lung_volume_ml"] > 0 and doc["candidates"] > 0
    if name.startswith("totalseg/chest"):
        assert doc["lung_volume_ml"] > 100


# ----------------------------------------------------------------------------------------------
# First contact: answers before the scan is read, progress in logs, help, exit codes, ITK
# ----------------------------------------------------------------------------------------------
def _scan_reads(monkeypatch):
    import ZeroShotILDLib.scan as scan_module

    reads = []

    def counting(path, *a, **k):
        reads.append(path)
        raise AssertionError("the scan was read")

    monkeypatch.setattr(scan_module, "read_scan", counting)
    return reads


def test_unknown_model_and_missing_weights_are_refused_before_the_scan_is_read(phantom_file, tmp_path, capsys,
                                                                                monkeypatch):
    reads = _scan_reads(monkeypatch)
    code, _, err = _run(["analyze", str(phantom_file), "-o", str(tmp_path / "a"), "--model", "gpt-clip"], capsys)
    assert code == 2 and "unknown model 'gpt-clip'" in err and err.count("\n") == 1
    empty = tmp_path / "weights"
    empty.mkdir()
    code, _, err = _run(["analyze", str(phantom_file), "-o", str(tmp_path / "b"), "--weights-dir", str(empty),
                         "--model", "chexzero"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "weights for 'chexzero' not found" in err and "models download chexzero" in err
    # The default model is openly licensed: the refusal names the one command that gets it.
    code, _, err = _run(["analyze", str(phantom_file), "-o", str(tmp_path / "c"), "--weights-dir", str(empty)], capsys)
    assert code == 2 and "zeroshot-ild models download clip-vit-b-32-laion" in err
    code, _, err = _run(["analyze", str(phantom_file), "-o", str(tmp_path / "d"), "--model",
                         f"dapt:{tmp_path / 'none.safetensors'}"], capsys)
    assert code == 2 and "does not exist" in err
    assert reads == [] and not any((tmp_path / n).exists() for n in "abcd")


def test_refusals_need_no_torch():
    """The checks above run in a process that has not imported torch (they answer in well under a second)."""
    import subprocess
    import sys

    code = ("import sys; from ZeroShotILDLib.cli import main; rc = main(['analyze', 'x.nii.gz', '-o', 'o', "
            "'--model', 'gpt-clip']); assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO))
    assert done.returncode == 2 and "unknown model" in done.stderr and "torch imported" not in done.stderr


def test_progress_in_a_log_is_one_line_per_stage(capsys):
    from ZeroShotILDLib.cli import TqdmProgress

    progress = TqdmProgress(tty=False)
    for stage in ("lung mask", "encoding patches"):
        for done in range(50):
            progress(stage, done, 50)
    progress.close()
    err = capsys.readouterr().err
    assert err.splitlines() == ["zeroshot-ild: lung mask", "zeroshot-ild: encoding patches"]
    assert "\r" not in err
    TqdmProgress(enabled=False, tty=False)("stage", 1, 2)
    assert capsys.readouterr().err == ""


def test_help_texts_have_examples_and_no_markup():
    import argparse

    from ZeroShotILDLib.cli import build_parser

    parser = build_parser()
    texts = {"zeroshot-ild": parser.format_help()}
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0]
    for name, sub in subs.choices.items():
        texts[name] = sub.format_help()
    models = subs.choices["models"]
    actions = [a for a in models._actions if isinstance(a, argparse._SubParsersAction)][0]
    texts["models download"] = actions.choices["download"].format_help()
    for name, text in texts.items():
        assert "``" not in text and "paper 0" not in text.lower(), name
        examples = text.split("examples:", 1)
        assert len(examples) == 2, f"{name}: no examples"
        assert sum("zeroshot-ild" in line for line in examples[1].splitlines()) >= 2, name


def test_version_and_verbose(capsys):
    from ZeroShotILDLib import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and __version__ in capsys.readouterr().out
    assert main(["-v", "models", "--no-hash"]) == 0


def test_mps_is_a_device_choice():
    from ZeroShotILDLib.cli import build_parser, settings_from_args

    args = build_parser().parse_args(["analyze", "x.nii.gz", "-o", "o", "--device", "mps"])
    assert settings_from_args(args).device == "mps"


def test_mps_where_torch_lacks_it_is_one_line(monkeypatch):
    import torch

    from ZeroShotILDLib.errors import InputError
    from ZeroShotILDLib.models import select_device

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(InputError, match="MPS"):
        select_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert select_device("mps").type == "mps"


def test_itk_warnings_stay_off_stderr(tmp_path):
    """A NIfTI whose sform scales differ from its voxel size makes ITK print 4 lines of warnings."""
    import struct
    import subprocess
    import sys

    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.full((8, 16, 16), -800, np.int16))
    image.SetSpacing((1.0, 1.0, 2.0))
    path = tmp_path / "scan.nii"
    sitk.WriteImage(image, str(path))
    data = bytearray(path.read_bytes())
    struct.pack_into("<h", data, 254, 1)  # sform_code
    for offset, row in ((280, (1.5, 0, 0, 0)), (296, (0, 1, 0, 0)), (312, (0, 0, 2, 0))):
        struct.pack_into("<4f", data, offset, *row)
    path.write_bytes(bytes(data))
    plain = subprocess.run([sys.executable, "-c", f"import SimpleITK as s; s.ReadImage({str(path)!r})"],
                           capture_output=True, text=True)
    assert "unexpected scales in sform" in plain.stderr  # what the user used to see
    done = subprocess.run([sys.executable, "-m", "ZeroShotILDLib.cli", "-q", "analyze", str(path), "-o",
                           str(tmp_path / "o"), *FAST], capture_output=True, text=True, cwd=str(REPO))
    assert "WARNING: In" not in done.stderr and "unexpected scales" not in done.stderr, done.stderr
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_nifti_whose_sform_disagrees_with_its_voxel_size_gets_a_note(small_phantom, tmp_path):
    """What ITK would have printed to stderr ("unexpected scales in sform") becomes a note of the scan."""
    import struct

    from ZeroShotILDLib.scan import read_scan

    path = tmp_path / "chest.nii"
    small_phantom.save(path)
    data = bytearray(path.read_bytes())
    assert struct.unpack_from("<h", data, 254)[0] > 0  # SimpleITK writes an sform
    for row in range(3):  # stretch the sform's first column (the x axis) by 1.6
        offset = 280 + 16 * row
        struct.pack_into("<f", data, offset, 1.6 * struct.unpack_from("<f", data, offset)[0])
    path.write_bytes(bytes(data))
    scan = read_scan(path)
    notes = [n for n in scan.notes if "sform" in n]
    assert len(notes) == 1 and "voxel size" in notes[0]
    small_phantom.save(tmp_path / "clean.nii")
    assert not [n for n in read_scan(tmp_path / "clean.nii").notes if "sform" in n]
