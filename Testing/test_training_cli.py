"""``zeroshot-ild-train`` end to end on a tiny phantom cohort with the tiny random model.

One module-scoped cohort (8 small phantoms, 4 with ILD) is split, preprocessed and trained on
once; each sub-command is then run on it through ``training.cli.main`` exactly as a user would,
and its outputs are checked. Scores of the random model are meaningless: the tests check the
plumbing (files, shapes, agreement with the library functions), never a score's size.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from training import cli
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
    manifest = folder / "split.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
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
        assert 0.0 <= float(r["auroc"]) <= 1.0 and r["threshold_source"] == "validation"
    # (no subtypes table: one positive test scan cannot rank one subtype against another)
    for name in ("results.md", "roc.png", "pr.png", "scores.csv", "settings.json"):
        assert (out / name).is_file(), name
    scores = read_rows(out / "scores.csv")
    assert len(scores) == 2  # the two test scans
    # The ensemble column is the mean of its members' probabilities, scored by the engine.
    from ZeroShotILDLib.pipeline import Analyzer
    from ZeroShotILDLib.settings import AnalysisSettings
    from training.manifest import read_manifest

    record = [r for r in read_manifest(cohort["manifest"]) if r.split == "test"][0]
    probabilities = []
    for member in members:
        settings = AnalysisSettings(model=f"dapt:{member}", device="cpu", patch_mm=40.0, slice_step_mm=12.0,
                                    filter_threshold=0.5, montage_size=4, retrieval="clip")
        result = Analyzer(settings).analyze(str(record.scan_path))
        probabilities.append(result.finding_probabilities["interstitial lung disease"])
    row = [s for s in scores if s["scan_id"] == record.scan_id][0]
    assert float(row["p_ild[ensemble:run]"]) == pytest.approx(np.mean(probabilities), abs=1e-6)
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
    assert code == 0 and "% ILD patches" in stdout
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
    code, stdout, _ = run(capsys, "alignment", cohort["manifest"], "--cache", cache, "--out", tmp_path / "align",
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
