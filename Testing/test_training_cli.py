"""``zeroshot-ild-train`` end to end on a tiny phantom cohort with the tiny random model.

One module-scoped cohort (8 small phantoms, 4 with ILD) is split, preprocessed and trained on
once; each sub-command is then run on it through ``zeroshot_ild_train.cli.main`` exactly as a user would,
and its outputs are checked. Scores of the random model are meaningless: the tests check the
plumbing (files, shapes, agreement with the library functions), never a score's size.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from zeroshot_ild_train import cli
from ZeroShotILDLib.models import load_model, read_checkpoint_metadata

# Small scans and large patches keep each engine analysis well under a second.
ENGINE = ["--model", "tiny-random", "--device", "cpu", "--patch-mm", "40", "--slice-step-mm", "12",
          "--filter-threshold", "0.5", "--montage-size", "4", "-q"]
TRAIN = ["--model", "tiny-random", "--batch-size", "2", "--max-steps", "2", "--val-every", "1", "--warmup-steps", "1",
         "--workers", "0", "--accelerator", "cpu", "--sentences", "2", "-q"]


def run(capsys, *argv) -> tuple:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def read_rows(path: Path) -> list:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def splits_by_patient(rows: list) -> dict:
    """{patient_id: set of splits} of a split CSV's rows, after checking that no patient spans two splits."""
    by_patient: dict = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_patient.values()), "a patient spans two splits"
    return by_patient


def write_rows(path: Path, rows: list) -> Path:
    """A manifest CSV with the columns of the first row (the test cohorts' split files)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """The phantom manifest with a fixed split: per class 2 train, 1 val, 1 test."""
    from ZeroShotILDLib.phantom import write_cohort

    folder = tmp_path_factory.mktemp("cohort")
    raw = write_cohort(folder, 8, seed=5, shape_zyx=(32, 96, 96), spacing_mm=(3.0, 3.0, 6.0))
    rows = read_rows(raw)
    seen = {"0": 0, "1": 0}
    for row in rows:
        row["split"] = ("train", "train", "val", "test")[seen[row["ild"]]]
        seen[row["ild"]] += 1
    manifest = write_rows(folder / "split.csv", rows)
    return {"folder": folder, "raw": raw, "manifest": manifest}


@pytest.fixture(scope="module")
def cache(cohort):
    folder = cohort["folder"] / "cache"
    assert cli.main(["preprocess", str(cohort["manifest"]), "--cache", str(folder), "--retrieval", "random",
                     *ENGINE]) == 0
    return folder


@pytest.fixture(scope="module")
def trained(cohort, cache):
    out = cohort["folder"] / "run"
    assert cli.main(["train", str(cohort["manifest"]), "--cache", str(cache), "--out", str(out), *TRAIN]) == 0
    return out


# ---------------------------------------------------------------------------------------------
def test_split_by_patient(capsys, cohort, tmp_path):
    out = tmp_path / "split.csv"
    code, stdout, _ = run(capsys, "split", cohort["raw"], "--out", out, "--val-fraction", "0.25", "--test-fraction", "0.25")
    assert code == 0 and out.is_file()
    rows = read_rows(out)
    splits = [r["split"] for r in rows]
    assert sorted(set(splits)) == ["test", "train", "val"]
    assert splits.count("val") == 2 and splits.count("test") == 2
    assert "train: 4 scans" in stdout
    code, _, err = run(capsys, "split", tmp_path / "missing.csv", "--out", out)
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err


def test_preprocess_shards_resume_and_errors(capsys, cohort, tmp_path):
    folder = tmp_path / "cache"
    common = ["preprocess", cohort["manifest"], "--cache", folder, "--retrieval", "random", *ENGINE]
    code, first, _ = run(capsys, *common, "--shard", "0/2")
    assert code == 0 and "4 montages written, 0 already finished" in first
    code, second, _ = run(capsys, *common, "--shard", "1/2")
    assert code == 0 and "4 montages written" in second
    assert len(list((folder / "montages").glob("*.png"))) == 8
    code, again, _ = run(capsys, *common)
    assert code == 0 and "0 montages written, 8 already finished" in again
    # The cohort QC table and its one line: per split scans, patients, text, montages, classes.
    assert "cohort QC: 8 scans of 8 patients (train 4 / val 2 / test 2)" in again
    qc = {r["split"]: r for r in read_rows(folder / "cohort_qc.csv")}
    assert qc["all"]["montages"] == "8" and qc["val"]["ild=1"] == "1" and qc["all"]["without_text"] == "0"
    cells = [len(json.loads(p.read_text(encoding="utf-8"))["patches"]) for p in (folder / "montages").glob("*.json")]
    assert qc["all"]["partly_empty_montages"] == str(sum(1 for n in cells if n < 16))
    # A half-written item (montage without its sidecar, as after a crash) is redone, not taken.
    sidecar = sorted((folder / "montages").glob("*.json"))[0]
    sidecar.unlink()
    code, redone, _ = run(capsys, *common)
    assert code == 0 and "1 montages written, 7 already finished" in redone and sidecar.is_file()
    code, _, err = run(capsys, *common, "--shard", "3/2")
    assert code == 2 and err.count("\n") == 1 and "shard" in err
    # Another montage setting in the same folder would mix caches.
    code, _, err = run(capsys, *common[:-len(ENGINE)], *ENGINE, "--montage-size", "8")
    assert code == 2 and "other montage settings" in err


def test_train_writes_engine_checkpoints_and_resume_is_a_no_op(capsys, cohort, cache, trained):
    summary = json.loads((trained / "dapt_summary.json").read_text(encoding="utf-8"))
    assert summary["result"]["global_step"] == 2 and summary["config"]["loss"] == "clip"
    best = trained / "best.safetensors"
    meta = read_checkpoint_metadata(best)
    assert meta["base_model"] == "tiny-random"
    assert meta["training"]["montage_settings"]["retrieval"] == "random"
    assert meta["training"]["montage_settings"]["montage_size"] == 4
    load_model(f"dapt:{best}", device="cpu")
    ensemble = json.loads((trained / "ensemble.json").read_text(encoding="utf-8"))
    assert len(ensemble["checkpoints"]) == 2
    # Resuming a finished run trains nothing more and reports the same best checkpoint.
    code, out, _ = run(capsys, "train", cohort["manifest"], "--cache", cache, "--out", trained, *TRAIN, "--resume")
    assert code == 0 and "after 2 steps" in out
    # Without --resume the run folder is protected.
    code, _, err = run(capsys, "train", cohort["manifest"], "--cache", cache, "--out", trained, *TRAIN)
    assert code == 2 and "--resume" in err
    # A cache that was never preprocessed, and labels missing for a label-aware loss.
    code, _, err = run(capsys, "train", cohort["manifest"], "--cache", cohort["folder"] / "nothing", "--out",
                       cohort["folder"] / "x", *TRAIN)
    assert code == 2 and "preprocess" in err and err.count("\n") == 1


def test_export_converts_the_resume_file(capsys, trained, tmp_path):
    out = tmp_path / "model.safetensors"
    code, stdout, _ = run(capsys, "export", trained / "checkpoints" / "last.ckpt", "--out", out)
    assert code == 0 and f"dapt:{out}" in stdout
    from safetensors.torch import load_file

    a, b = load_file(str(out)), load_file(str(trained / "checkpoints" / "last.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    code, _, err = run(capsys, "export", trained / "best.safetensors", "--out", out)
    assert code == 2 and "not a Lightning .ckpt" in err


def test_sweep_over_two_learning_rates(capsys, cohort, cache, tmp_path):
    code, out, _ = run(capsys, "sweep", cohort["manifest"], "--cache", cache, "--out", tmp_path / "sweep", *TRAIN,
                       "--max-steps", "1", "--lrs", "1e-5,1e-2")
    assert code == 0 and "best learning rate" in out
    rows = read_rows(tmp_path / "sweep" / "sweep.csv")
    assert len(rows) == 2
    best = min(rows, key=lambda r: float(r["best_val_loss"]))
    assert f"best learning rate {float(best['learning_rate']):.2e}" in out


def test_evaluate_models_and_ensemble(capsys, cohort, trained, tmp_path):
    out = tmp_path / "eval"
    # The best top-k checkpoint is also an ensemble member, so it is scored once for both rows.
    # ensemble.json stores paths relative to its own folder.
    members = [str((trained / c["path"]).resolve())
               for c in json.loads((trained / "ensemble.json").read_text(encoding="utf-8"))["checkpoints"]]
    best = members[0]
    code, stdout, _ = run(capsys, "evaluate", cohort["manifest"], "--out", out, *ENGINE, "--retrieval", "clip",
                          "--models", "tiny-random", "--models", f"dapt:{best}", "--ensemble", trained / "ensemble.json",
                          "--resamples", "50")
    assert code == 0, stdout
    rows = read_rows(out / "results.csv")
    assert [r["model"] for r in rows] == ["tiny-random", f"dapt:{best}", "ensemble:run"]
    for r in rows:
        assert 0.0 <= float(r["auroc"]) <= 1.0 and r["threshold_source"] == "val split"
    # (no subtypes table: one positive test scan cannot rank one subtype against another)
    for name in ("results.md", "roc.png", "pr.png", "scores.csv", "settings.json"):
        assert (out / name).is_file(), name
    scores = read_rows(out / "scores.csv")
    assert len(scores) == 2  # the two test scans
    # The ensemble column is the mean of its members' probabilities, scored by the engine.
    from ZeroShotILDLib.pipeline import Analyzer
    from ZeroShotILDLib.settings import AnalysisSettings
    from zeroshot_ild_train.manifest import read_manifest

    record = [r for r in read_manifest(cohort["manifest"]) if r.split == "test"][0]
    probabilities = []
    for member in members:
        settings = AnalysisSettings(model=f"dapt:{member}", device="cpu", patch_mm=40.0, slice_step_mm=12.0,
                                    filter_threshold=0.5, montage_size=4, retrieval="clip")
        result = Analyzer(settings).analyze(str(record.scan_path))
        probabilities.append(result.finding_probabilities["interstitial lung disease"])
    row = [s for s in scores if s["scan_id"] == record.scan_id][0]
    assert float(row["p[ensemble:run]"]) == pytest.approx(np.mean(probabilities), abs=1e-6)
    code, _, err = run(capsys, "evaluate", cohort["manifest"], "--out", out, *ENGINE, "--split", "nope")
    assert code == 2 and "split 'nope'" in err


def test_grid_reproduces_the_table_layout(capsys, cohort, tmp_path):
    out = tmp_path / "grid"
    code, stdout, _ = run(capsys, "grid", cohort["manifest"], "--out", out, *ENGINE, "--retrievals", "clip,random",
                          "--montage-sizes", "4,8", "--resamples", "20")
    assert code == 0 and "4 grid cells" in stdout
    rows = read_rows(out / "grid.csv")
    assert [(r["retrieval"], r["montage_size"]) for r in rows] == [("clip", "4"), ("clip", "8"), ("random", "4"),
                                                                   ("random", "8")]
    table = (out / "grid.md").read_text(encoding="utf-8")
    assert "Patch Montage Method" in table and "Montage Size" in table and "8 × 8" in table
    assert (out / "roc.png").is_file() and (out / "pr.png").is_file()
    # Every cell's AUROC recomputes from the per-scan scores it was made of.
    from zeroshot_ild_train import metrics

    scores = read_rows(out / "scores.csv")
    y = np.array([int(r["ild"]) for r in scores])
    cells = [c for c in scores[0] if c.startswith("p[")]
    assert len(cells) == 4
    for row, cell in zip(rows, cells):
        assert row["retrieval"] in cell and f"{row['montage_size']}x{row['montage_size']}" in cell
        s = np.array([float(r[cell]) for r in scores])
        assert float(row["auroc"]) == pytest.approx(metrics.roc_auc(y, s), abs=1e-9)
    code, _, err = run(capsys, "grid", cohort["manifest"], "--out", out, *ENGINE, "--montage-sizes", "5")
    assert code == 2 and err.count("\n") == 1


def test_reader_study_export_and_analyze(capsys, cohort, tmp_path):
    study = tmp_path / "study"
    code, _, _ = run(capsys, "reader-study", "export", cohort["manifest"], "--out", study, *ENGINE,
                     "--methods", "random,clip", "--readers", "r1,r2")
    assert code == 0
    images = sorted((study / "images").glob("*.png"))
    assert len(images) == 4  # 2 test scans x 2 methods
    sheets = []
    rng = np.random.default_rng(0)
    for reader in ("r1", "r2"):
        rows = read_rows(study / f"counts_{reader}.csv")
        for r in rows:
            r["count"] = str(int(rng.integers(0, 17)))
        sheet = tmp_path / f"filled_{reader}.csv"
        with open(sheet, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        sheets.append(sheet)
    out = tmp_path / "table"
    code, stdout, _ = run(capsys, "reader-study", "analyze", study, *sheets, "--out", out)
    assert code == 0 and "% patches with ILD" in stdout
    rows = read_rows(out / "reader_study.csv")
    assert {r["method"] for r in rows} == {"random", "clip"}
    assert {r["group"] for r in rows} == {"Positive", "Negative"}
    code, _, err = run(capsys, "reader-study", "analyze", tmp_path, *sheets, "--out", out)
    assert code == 2 and "study.json" in err


def test_probe_and_alignment(capsys, cohort, cache, tmp_path):
    code, stdout, _ = run(capsys, "probe", cohort["manifest"], "--cache", cache, "--out", tmp_path / "probe",
                          "--model", "tiny-random", "--device", "cpu", "--label", "ild", "--k", "1", "--repeats", "2",
                          "-q")
    assert code == 0 and "1-shot linear probe" in stdout
    result = json.loads((tmp_path / "probe" / "probe.json").read_text(encoding="utf-8"))
    assert result["classes"] == ["no ild", "ild"] and len(result["linear_probe"]["runs"]) == 2
    # The same numbers as a Markdown table beside the JSON.
    table = (tmp_path / "probe" / "probe.md").read_text(encoding="utf-8")
    lp = result["linear_probe"]
    assert f"| 1-shot linear probe | {lp['aca_mean']:.3f} ± {lp['aca_std']:.3f} |" in table
    assert f"| zero-shot | {result['zero_shot']['aca']:.3f} |" in table
    # alignment reads text from its split only: a text-less row in another split does not stop it.
    rows = read_rows(cohort["manifest"])
    for r in rows:
        if r["split"] == "train":
            r["report_text"] = ""
    textless = write_rows(cohort["folder"] / "textless_train.csv", rows)
    code, stdout, _ = run(capsys, "alignment", textless, "--cache", cache, "--out", tmp_path / "align",
                          "--model", "tiny-random", "--device", "cpu", "-q")
    assert code == 0 and "report-level cosine" in stdout
    result = json.loads((tmp_path / "align" / "alignment.json").read_text(encoding="utf-8"))
    assert result["n_images"] == 2 and -1.0 <= result["report_mean"] <= 1.0 and "sentence_mean" in result
    code, _, err = run(capsys, "probe", cohort["manifest"], "--cache", cache, "--out", tmp_path / "p2",
                       "--model", "tiny-random", "--device", "cpu", "--base", "emphysema", "-q")
    assert code == 2 and "--base" in err


class _Payload:
    """Stands in for a malicious pickle: outside torch's weights-only allow-list."""


def test_pickle_as_last_ckpt_is_refused_in_one_line(capsys, cohort, cache, trained, tmp_path):
    import shutil

    import torch

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    (run_dir / "dapt_summary.json").unlink()  # an interrupted run: resume would really load last.ckpt
    torch.save({"state_dict": {}, "payload": _Payload()}, run_dir / "checkpoints" / "last.ckpt")
    # As a run killed while writing would leave it (issue 25: a changed file is otherwise foreign).
    import subprocess
    import sys

    from training.files import TRAIN_MANIFEST

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    doc = json.loads((run_dir / TRAIN_MANIFEST).read_text(encoding="utf-8"))
    (run_dir / TRAIN_MANIFEST).write_text(json.dumps(dict(doc, running={"pid": dead.pid})), encoding="utf-8")
    code, _, err = run(capsys, "train", cohort["manifest"], "--cache", cache, "--out", run_dir, *TRAIN, "--resume")
    assert code == 2 and err.count("\n") == 1 and "pickled Python objects, refused" in err
    assert "Traceback" not in err
    code, _, err = run(capsys, "export", run_dir / "checkpoints" / "last.ckpt", "--out", tmp_path / "m.safetensors")
    assert code == 2 and err.count("\n") == 1 and "refused for safety" in err
    assert not (tmp_path / "m.safetensors").exists()
    # Kept away from its run folder, the pickle is still refused first (not a request for --model).
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(run_dir / "checkpoints" / "last.ckpt", alone / "last.ckpt")
    code, _, err = run(capsys, "export", alone / "last.ckpt", "--out", tmp_path / "m.safetensors")
    assert code == 2 and err.count("\n") == 1 and "refused for safety" in err
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    code, _, err = run(capsys, "export", run_dir / "checkpoints" / "last.ckpt", "--out", tmp_path / "m.safetensors")
    assert code == 2 and err.count("\n") == 1 and "damaged" in err


def test_export_of_an_interrupted_run_reads_its_settings_from_the_run_folder(capsys, trained, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    (run_dir / "dapt_summary.json").unlink()  # written only when a run finishes
    out = tmp_path / "model.safetensors"
    code, stdout, err = run(capsys, "export", run_dir / "checkpoints" / "last.ckpt", "--out", out)
    assert code == 0 and f"dapt:{out}" in stdout, err
    assert read_checkpoint_metadata(out)["training"]["loss"] == "clip"
    # A .ckpt kept on its own: the settings come from flags, or the message says which to give.
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(run_dir / "checkpoints" / "last.ckpt", alone / "last.ckpt")
    code, _, err = run(capsys, "export", alone / "last.ckpt", "--out", tmp_path / "x.safetensors")
    assert code == 2 and err.count("\n") == 1 and "--model" in err
    code, stdout, err = run(capsys, "export", alone / "last.ckpt", "--out", tmp_path / "x.safetensors",
                            "--model", "tiny-random", "--loss", "clip")
    assert code == 0, err
    from safetensors.torch import load_file

    a, b = load_file(str(out)), load_file(str(tmp_path / "x.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


# ---------------------------------------------------------------------------------------------
# Evaluation on real-looking cohorts (issue 12)
def _write_manifest(path: Path, rows: list) -> Path:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture()
def mixed_cohort(cohort, tmp_path):
    """The phantom val/test rows, a volume without lungs and two 2-D PNG slices (one with its pixel size)."""
    import SimpleITK as sitk
    from PIL import Image

    rows = [dict(r) for r in read_rows(cohort["manifest"]) if r["split"] in ("val", "test")]
    for r in rows:
        r["scan_path"] = str(cohort["folder"] / r["scan_path"])
    body = np.full((8, 64, 64), -1000, np.int16)  # air around a solid soft-tissue body: no lungs in it
    yy, xx = np.mgrid[:64, :64]
    body[:, (yy - 32) ** 2 + (xx - 32) ** 2 < 26 ** 2] = 40
    body += np.random.default_rng(0).integers(-20, 20, body.shape).astype(np.int16)
    soft_tissue = sitk.GetImageFromArray(body)
    soft_tissue.SetSpacing((3.0, 3.0, 6.0))
    sitk.WriteImage(soft_tissue, str(tmp_path / "abdomen.nii.gz"))
    rows.append({"scan_path": str(tmp_path / "abdomen.nii.gz"), "ild": "1", "split": "test", "patient_id": "abdomen",
                 "subtype": "systemic sclerosis"})
    rng = np.random.default_rng(3)
    for k, (ild, subtype, spacing) in enumerate((("1", "hypersensitivity pneumonitis", "0.75"), ("0", "", ""))):
        Image.fromarray(rng.integers(0, 255, (120, 140), dtype=np.uint8)).save(tmp_path / f"slice{k}.png")
        rows.append({"scan_path": str(tmp_path / f"slice{k}.png"), "ild": ild, "subtype": subtype, "split": "test",
                     "patient_id": f"png{k}", "pixel_spacing_mm": spacing})
    return _write_manifest(tmp_path / "mixed.csv", rows)


def test_evaluate_lists_failed_scans_reads_2d_rows_and_resumes(capsys, caplog, mixed_cohort, tmp_path, monkeypatch):
    from zeroshot_ild_train import preprocess

    out = tmp_path / "eval"
    argv = ["evaluate", mixed_cohort, "--out", out, *ENGINE, "--retrieval", "clip", "--resamples", "20",
            "--prompt", "COVID-19 pneumonia"]
    code, stdout, err = run(capsys, *argv)
    assert code == 3, err  # one scan failed: the rest are evaluated, the exit code says so
    failures = read_rows(out / "failures.csv")
    assert [f["scan_id"] for f in failures] == [str(tmp_path / "abdomen.nii.gz")]
    assert "no lungs" in failures[0]["reason"] and failures[0]["split"] == "test"
    assert f"could not be scored (listed in {out / 'failures.csv'})" in err and "1 mm per pixel assumed" in caplog.text
    scores = read_rows(out / "scores.csv")
    assert len(scores) == 4 and {s["scan_id"] for s in scores} >= {str(tmp_path / "slice0.png"), str(tmp_path / "slice1.png")}
    results = (out / "results.md").read_text(encoding="utf-8")
    assert "COVID-19 pneumonia vs no COVID-19 pneumonia" in results and "ILD vs" not in results
    assert "abdomen.nii.gz" in results and "1 mm per pixel assumed" in results
    assert json.loads((out / "settings.json").read_text(encoding="utf-8"))["n_failed"] == 1
    # Subtypes: on every test scan (paper 000 Table 4) and, second, among the positive ones only.
    everyone = (out / "subtypes.md").read_text(encoding="utf-8")
    assert "every other test scan (4 scans" in everyone
    assert "positive" in (out / "subtypes_among_positive.md").read_text(encoding="utf-8")
    # A re-run reads only the scan that failed; finished scans come from the score cache.
    read = []
    original = preprocess.read_any_scan
    monkeypatch.setattr(preprocess, "read_any_scan", lambda path, *a, **k: read.append(Path(path).name) or original(path, *a, **k))
    code, _, _ = run(capsys, *argv)
    assert code == 3 and read == ["abdomen.nii.gz"]
    assert read_rows(out / "scores.csv") == scores
    # grid shares the scoring: the same scan is listed, the rest tabled.
    code, _, _ = run(capsys, "grid", mixed_cohort, "--out", tmp_path / "grid", *ENGINE, "--retrievals", "random",
                     "--resamples", "0")
    assert code == 3 and [f["scan_id"] for f in read_rows(tmp_path / "grid" / "failures.csv")] == [failures[0]["scan_id"]]
    assert "abdomen.nii.gz" in (tmp_path / "grid" / "grid.md").read_text(encoding="utf-8")


def test_evaluate_threshold_split_label_and_pixel_size(capsys, cohort, tmp_path):
    rows = [dict(r, label_fibrosis=r["ild"]) for r in read_rows(cohort["manifest"])]
    for r in rows:
        r["scan_path"] = str(cohort["folder"] / r["scan_path"])
    manifest = _write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "eval"
    code, stdout, err = run(capsys, "evaluate", manifest, "--out", out, *ENGINE, "--retrieval", "random",
                            "--resamples", "0", "--label", "label_fibrosis", "--threshold-split", "none")
    assert code == 0, err
    rows_out = read_rows(out / "results.csv")
    from zeroshot_ild_train import metrics

    assert rows_out[0]["threshold_source"] == metrics.OPTIMISTIC
    assert "optimistic" in (out / "results.md").read_text(encoding="utf-8")
    assert "fibrosis" in read_rows(out / "scores.csv")[0]
    code, _, err = run(capsys, "evaluate", manifest, "--out", out, *ENGINE, "--label", "label_nope")
    assert code == 2 and "no label 'label_nope'" in err and "fibrosis" in err
    code, _, err = run(capsys, "evaluate", manifest, "--out", out, *ENGINE, "--pixel-spacing-mm", "-1")
    assert code == 2 and "--pixel-spacing-mm" in err


def test_split_stratifies_by_label_and_keeps_patients_whole(capsys, tmp_path):
    rows = []
    for patient in range(40):
        for scan in range(2):  # two scans per patient, one label per patient: 10 positive patients
            rows.append({"scan_path": f"p{patient}_{scan}.nii.gz", "patient_id": f"P{patient}",
                         "label_covid": int(patient % 4 == 0)})
    manifest = _write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "split.csv"
    code, stdout, err = run(capsys, "split", manifest, "--out", out, "--val-fraction", "0.2", "--test-fraction", "0.4",
                            "--stratify", "covid")
    assert code == 0, err
    split = read_rows(out)
    by_patient = splits_by_patient(split)
    positives = {name: sum(1 for p, s in by_patient.items() if s == {name} and int(p[1:]) % 4 == 0)
                 for name in ("train", "val", "test")}
    assert positives == {"train": 4, "val": 2, "test": 4}  # 40 / 20 / 40 % of the 10 positive patients
    assert "covid 0: 24, 1: 8" in stdout  # the test line: 12 patients x 2 scans
    code, _, err = run(capsys, "split", manifest, "--out", out, "--stratify", "ild")
    assert code == 2 and "ild" in err and err.count("\n") == 1


def test_preview_text_shows_the_choice_on_stdout_and_warns_without_text(capsys, tmp_path, caplog):
    secret = "Subpleural reticulation in both lower lobes."
    rows = [{"scan_path": f"s{i}.nii.gz", "report_text": f"Report: Findings - {secret} Impression: UIP pattern {i}."}
            for i in range(4)]
    manifest = _write_manifest(tmp_path / "m.csv", rows)
    code, stdout, err = run(capsys, "preview-text", manifest, "--text", "findings+impression", "-n", "1")
    assert code == 0 and secret in stdout and stdout.count("===") == 2
    assert "findings+impression 4 of 4" in stdout
    code, stdout, err = run(capsys, "preview-text", manifest, "--text", "lung", "-n", "0")
    assert code == 0 and "lung 0 of 4" in stdout
    logged = err + caplog.text
    assert "--text lung finds no text in 4 of 4 reports" in logged and secret not in logged


def test_probe_takes_any_label_and_the_runs_prompt(capsys, cohort, cache, tmp_path):
    rows = [dict(r, label_fibrosis=r["ild"], scan_id=r["scan_path"]) for r in read_rows(cohort["manifest"])]
    for r in rows:  # same scan ids and files: the cached montages are found
        r["scan_path"] = str(cohort["folder"] / r["scan_path"])
    manifest = _write_manifest(tmp_path / "m.csv", rows)
    code, stdout, err = run(capsys, "probe", manifest, "--cache", cache, "--out", tmp_path / "probe", "--model",
                            "tiny-random", "--device", "cpu", "--label", "label_fibrosis", "--prompt", "pulmonary fibrosis",
                            "--k", "1", "--repeats", "1", "-q")
    assert code == 0, err
    result = json.loads((tmp_path / "probe" / "probe.json").read_text(encoding="utf-8"))
    assert result["classes"] == ["no fibrosis", "fibrosis"]
    assert result["zero_shot_texts"] == ["no pulmonary fibrosis", "pulmonary fibrosis"]


def _figure_rows(folder, seed: int) -> list:
    """Two 2-D figure crops (PNG) as manifest rows, one ILD-positive."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = []
    for k in range(2):
        Image.fromarray(rng.integers(0, 255, (100, 136), dtype=np.uint8)).save(folder / f"s{k}.png")
        rows.append({"scan_path": f"s{k}.png", "ild": str(k), "pixel_spacing_mm": "0.5"})
    return rows


def test_reader_study_exports_2d_rows(capsys, tmp_path):
    manifest = _write_manifest(tmp_path / "m.csv", _figure_rows(tmp_path, 1))
    code, _, err = run(capsys, "reader-study", "export", manifest, "--out", tmp_path / "study", *ENGINE,
                       "--methods", "random", "--readers", "r1")
    assert code == 0, err
    assert len(list((tmp_path / "study" / "images").glob("*.png"))) == 2


def test_reader_study_leaves_a_broken_scan_out(capsys, tmp_path):
    rows = _figure_rows(tmp_path, 2)
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    rows.append({"scan_path": "broken.nii.gz", "ild": "1", "pixel_spacing_mm": ""})
    manifest = _write_manifest(tmp_path / "m.csv", rows)
    study = tmp_path / "study"
    code, _, err = run(capsys, "reader-study", "export", manifest, "--out", study, *ENGINE,
                       "--methods", "random", "--readers", "r1")
    assert code == 3 and "1 scan(s) could not be" in err and "Traceback" not in err
    assert len(list((study / "images").glob("*.png"))) == 2
    failed = read_rows(study / "failures.csv")
    assert [r["scan_id"] for r in failed] == ["broken.nii.gz"] and failed[0]["reason"]
    assert "broken.nii.gz" not in json.loads((study / "study.json").read_text(encoding="utf-8"))["groups"]
    # Nothing usable at all: one line, no study written.
    only_broken = _write_manifest(tmp_path / "b.csv", rows[2:])
    code, _, err = run(capsys, "reader-study", "export", only_broken, "--out", tmp_path / "none", *ENGINE,
                       "--methods", "random")
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "none").exists()


def test_train_leaves_rows_without_text_out(capsys, caplog, cohort, cache, tmp_path):
    rows = [dict(r, scan_id=r["scan_path"]) for r in read_rows(cohort["manifest"])]
    for r in rows:
        r["scan_path"] = str(cohort["folder"] / r["scan_path"])
    rows[0]["report_text"] = ""  # an image-only row (e.g. a negative without a caption)
    manifest = _write_manifest(tmp_path / "m.csv", rows)
    code, stdout, err = run(capsys, "train", manifest, "--cache", cache, "--out", tmp_path / "run", *TRAIN)
    assert code == 0, err
    assert "1 of 8 rows have no report and are left out of training" in caplog.text


def test_covid_folder_becomes_a_manifest(tmp_path, capsys):
    from conftest import shared_data
    from zeroshot_ild_train import covid
    from zeroshot_ild_train.manifest import read_manifest

    folder = shared_data("real", "pairs", "covid_ct")
    out = tmp_path / "sub" / "cohort.csv"
    assert covid.main(["--data", str(folder), "--write-manifest", str(out), "--fov-mm", "350"]) == 0
    records = read_manifest(out)
    assert len(records) > 700 and {r.labels["covid"] for r in records} == {0, 1}
    assert all(r.pixel_spacing_mm and r.scan_path.is_file() for r in records)
    assert sum(r.report_text is not None for r in records) > 300
    captions = [r.report_text for r in records if r.report_text]
    assert not any(c in capsys.readouterr().out for c in captions[:20])  # counts only are printed


def test_a_real_scan_without_lungs_is_listed_not_fatal(capsys, cohort, tmp_path):
    """The real abdominal DICOM series (no lungs in it) among the phantom test scans."""
    from conftest import shared_data

    series = shared_data("real", "ct", "totalseg", "abdomen_dicom_series")
    rows = [dict(r) for r in read_rows(cohort["manifest"]) if r["split"] in ("val", "test")]
    for r in rows:
        r["scan_path"] = str(cohort["folder"] / r["scan_path"])
    rows.append({"scan_path": str(series), "scan_id": "abdomen", "ild": "0", "split": "test", "patient_id": "abdomen"})
    manifest = _write_manifest(tmp_path / "m.csv", rows)
    code, stdout, err = run(capsys, "evaluate", manifest, "--out", tmp_path / "eval", *ENGINE, "--retrieval", "random",
                            "--resamples", "0")
    assert code == 3, err
    (failure,) = read_rows(tmp_path / "eval" / "failures.csv")
    assert failure["scan_id"] == "abdomen" and "no lungs" in failure["reason"]
    assert len(read_rows(tmp_path / "eval" / "scores.csv")) == 2 and "AUROC" in stdout


def test_help_answers_without_torch_or_lightning():
    """--help reads its defaults from the torch-free settings module (it used to import Lightning: 12-16 s)."""
    import subprocess
    import sys

    code = ("import sys; from zeroshot_ild_train.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    rc = e.code\n"
            "for sub in ('train', 'sweep', 'evaluate'):\n"
            "    try:\n        main([sub, '--help'])\n    except SystemExit:\n        pass\n"
            "heavy = [m for m in ('torch', 'lightning', 'open_clip') if m in sys.modules]\n"
            "sys.exit(f'imported {heavy}' if heavy else rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=str(Path(__file__).resolve().parents[1]))
    assert done.returncode == 0, done.stderr
    assert "examples:" in done.stdout and "``" not in done.stdout and "paper 0" not in done.stdout


def test_version_and_settings_names_match_the_trainer(capsys):
    from zeroshot_ild_train import dapt, dapt_config, losses
    from ZeroShotILDLib import __version__

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and __version__ in capsys.readouterr().out
    assert dapt.DaptConfig is dapt_config.DaptConfig
    assert (dapt_config.RELAX_THRESHOLD, dapt_config.RELAX_SLOPE) == (losses.RELAX_THRESHOLD, losses.RELAX_SLOPE)


def test_every_command_has_two_examples():
    import argparse

    parser = cli.build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0]
    parsers = dict(subs.choices)
    study = [a for a in parsers["reader-study"]._actions if isinstance(a, argparse._SubParsersAction)][0]
    parsers.update({f"reader-study {k}": v for k, v in study.choices.items()})
    for name, sub in parsers.items():
        text = sub.format_help()
        examples = text.split("examples:", 1)
        assert len(examples) == 2 and examples[1].count("zeroshot-ild-train") >= 2, name
        assert "``" not in text and "paper 0" not in text, name


def test_split_balances_images_when_patients_have_different_numbers_of_scans(capsys, tmp_path):
    # Positive patients have 1-6 scans, negative ones 1-2: balancing patients would skew the image
    # shares that every per-image AUROC sees; the split keeps patients whole and balances images.
    rng = np.random.default_rng(3)
    rows = []
    for patient in range(120):
        positive = patient % 3 == 0
        for scan in range(int(rng.integers(1, 7 if positive else 3))):
            rows.append({"scan_path": f"p{patient}_{scan}.nii.gz", "patient_id": f"P{patient}",
                         "label_covid": int(positive)})
    manifest = _write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "split.csv"
    code, stdout, err = run(capsys, "split", manifest, "--out", out, "--val-fraction", "0.15", "--test-fraction", "0.3",
                            "--stratify", "covid", "--seed", "1")
    assert code == 0, err
    split = read_rows(out)
    by_patient = splits_by_patient(split)
    overall = np.mean([int(r["label_covid"]) for r in split])
    for name, fraction in (("val", 0.15), ("test", 0.3)):
        mine = [int(r["label_covid"]) for r in split if r["split"] == name]
        assert abs(np.mean(mine) - overall) < 0.03, name  # image class balance kept
        assert abs(len(mine) / len(split) - fraction) < 0.03, name  # and the split's share of images
    # Each split's line reports its image and patient balance.
    val_line = next(line for line in stdout.splitlines() if line.startswith("val:"))
    assert "% of scans" in val_line and "% of patients positive" in val_line


def test_evaluate_shards_merge_to_the_same_summary_as_one_run(capsys, cohort, tmp_path):
    args = ["evaluate", cohort["manifest"], *ENGINE, "--resamples", "50"]
    assert run(capsys, *args, "--out", tmp_path / "one")[0] == 0
    shards = []
    for i in range(3):
        code, stdout, err = run(capsys, *args, "--out", tmp_path / f"s{i}", "--shard", f"{i}/3")
        assert code == 0, err
        assert f"shard {i}/3" in stdout and not (tmp_path / f"s{i}" / "results.md").exists()
        shards.append(tmp_path / f"s{i}")
    code, _, err = run(capsys, *args, "--out", tmp_path / "merged", "--merge-shards", *shards[:2])
    assert code == 2 and "shard(s) 2 of 3 missing" in err
    code, _, err = run(capsys, *args, "--out", tmp_path / "merged", "--merge-shards", *shards)
    assert code == 0, err
    for name in ("results.csv", "scores.csv", "threshold_scores.csv"):
        assert read_rows(tmp_path / "merged" / name) == read_rows(tmp_path / "one" / name), name
    # Shards of another evaluation (another label here) are refused.
    code, _, err = run(capsys, *args, "--out", tmp_path / "other", "--merge-shards", *shards, "--montage-size", "8")
    assert code == 2 and "another evaluation" in err


def test_score_cache_is_keyed_on_the_weights_content_not_their_path(capsys, cohort, trained, tmp_path):
    import shutil

    out = tmp_path / "eval"
    args = ["evaluate", cohort["manifest"], *ENGINE, "--resamples", "20", "--out", out]
    assert run(capsys, *args, "--models", f"dapt:{trained / 'best.safetensors'}")[0] == 0
    cached = sorted(p.name for p in (out / ".scan_scores").iterdir())
    moved = tmp_path / "moved_run"
    shutil.copytree(trained, moved)
    assert run(capsys, *args, "--models", f"dapt:{moved / 'best.safetensors'}")[0] == 0
    # The same weights at another path: every score came from the cache, none was added.
    assert sorted(p.name for p in (out / ".scan_scores").iterdir()) == cached
    record = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert record["command"] == "evaluate" and str(moved / "best.safetensors") in " ".join(record["argv"])
    # The checkpoint's own training verdict travels into the evaluation's notes.
    health = read_checkpoint_metadata(moved / "best.safetensors")["training"]["health"]
    unhealthy = health["collapsed"] or health["at_chance"]
    assert ("recorded this checkpoint as not healthy" in (out / "results.md").read_text(encoding="utf-8")) == unhealthy
