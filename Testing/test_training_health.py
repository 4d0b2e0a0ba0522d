"""Training that says when it is not learning, and runs that survive pre-emption (issue 12).

A phantom cohort (12 scans, 6 with ILD; 4 validation scans, two per class) is preprocessed once.
The phantom demo model was trained on exactly such montages and reports, so a run at a tiny
learning rate stays healthy (validation loss below chance, embeddings spread), while the same
run at learning rate 1.0 collapses; both go through ``python -m zeroshot_ild_train train`` as a user's would.
"""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_training_cli import read_rows, write_rows
from zeroshot_ild_train import cli, dapt

ENGINE = ["--model", "tiny-random", "--device", "cpu", "--patch-mm", "40", "--slice-step-mm", "12",
          "--filter-threshold", "0.5", "--montage-size", "4", "-q"]
TRAIN = ["--model", "phantom-demo", "--batch-size", "4", "--val-every", "2", "--warmup-steps", "1", "--workers", "0",
         "--accelerator", "cpu", "-q"]


def run(capsys, *argv) -> tuple:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from ZeroShotILDLib.phantom import write_cohort

    folder = tmp_path_factory.mktemp("health")
    raw = write_cohort(folder, 12, seed=7, shape_zyx=(32, 96, 96), spacing_mm=(3.0, 3.0, 6.0))
    with open(raw, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    seen = {"0": 0, "1": 0}
    for row in rows:
        row["split"] = "val" if seen[row["ild"]] < 2 else "train"
        seen[row["ild"]] += 1
    manifest = write_rows(folder / "split.csv", rows)
    cache = folder / "cache"
    assert cli.main(["preprocess", str(manifest), "--cache", str(cache), "--retrieval", "random", *ENGINE]) == 0
    return {"folder": folder, "manifest": manifest, "cache": cache}


def summary(out: Path) -> dict:
    return json.loads((out / "dapt_summary.json").read_text(encoding="utf-8"))


def test_healthy_and_collapsed_runs_are_told_apart(capsys, caplog, cohort, tmp_path):
    common = [cohort["manifest"], "--cache", cohort["cache"], *TRAIN, "--max-steps", "4"]
    code, out, err = run(capsys, "train", *common, "--out", tmp_path / "healthy", "--lr", "1e-7")
    assert code == 0, err
    health = summary(tmp_path / "healthy")["result"]["health"]
    assert health["collapsed"] is False and health["at_chance"] is False and health["warning"] is None
    assert not [r for r in caplog.records if "not learning" in r.getMessage()]
    last = health["last"]
    # Every validation logs the chance level, the spread, retrieval and zero-shot AUROC.
    assert last["val_chance"] == pytest.approx(math.log(4))
    assert last["val_loss"] < last["val_chance"]
    assert {"val_mean_cosine", "val_effective_rank", "val_recall_at_1", "val_auroc"} <= set(last)
    with open(tmp_path / "healthy" / "logs" / "metrics.csv", newline="", encoding="utf-8") as handle:
        columns = set(next(csv.reader(handle)))
    assert {"val_loss", "val_chance", "val_auroc", "val_mean_cosine", "val_effective_rank", "train_chance"} <= columns

    code, out, err = run(capsys, "train", *common, "--out", tmp_path / "collapsed", "--lr", "1.0")
    assert code == 0, err
    health = summary(tmp_path / "collapsed")["result"]["health"]
    assert health["collapsed"] is True
    assert health["last"]["val_mean_cosine"] > health["initial"]["val_mean_cosine"]
    warnings = [r.getMessage() for r in caplog.records if "not learning" in r.getMessage()]
    assert len(warnings) == 1 and "collapsed" in warnings[0] and "\n" not in warnings[0]
    # The verdict travels in the exported weights, where the engine reads it (issue 20: "meaningful" from evidence).
    from ZeroShotILDLib.models import read_checkpoint_metadata

    for run_name, collapsed in (("collapsed", True), ("healthy", False)):
        last = sorted((tmp_path / run_name).rglob("last*.safetensors"))
        assert last, run_name
        recorded = read_checkpoint_metadata(last[-1])["training"]["health"]
        assert recorded["collapsed"] is collapsed and recorded["validations"] >= 1


def test_max_steps_is_not_cut_by_the_default_epoch_limit():
    config = dapt.DaptConfig(output_dir="x", max_steps=100)
    assert dapt.plan_steps(config, steps_per_epoch=3) == (100, -1, "max_steps")
    assert dapt.plan_steps(dapt.DaptConfig(output_dir="x"), 3) == (30, 10, "max_epochs (default 10)")
    both = dapt.DaptConfig(output_dir="x", max_steps=100, max_epochs=10)
    assert dapt.plan_steps(both, 3) == (30, 10, "max_epochs")
    assert dapt.plan_steps(dapt.DaptConfig(output_dir="x", max_steps=20, max_epochs=10), 3) == (20, 10, "max_steps")


def test_default_recipe_is_paper_000_and_augmentation_keeps_density(cohort):
    import numpy as np
    import torch

    from zeroshot_ild_train.data import INTENSITY_RANGE, WEAK, STRONG, augment, view_augmentation

    config = dapt.DaptConfig(output_dir="x")
    assert (config.recipe, config.text_choice, config.sentences_per_sample) == ("paper000", "impression", 0)
    assert dapt.recipe_config("paper001") == {"text_choice": "findings+impression", "sentences_per_sample": 3}
    assert not config.intensity_augment
    # A flat image stays flat under the default (geometric) augmentations: no density change.
    flat = torch.full((1, 32, 32), 0.4)
    for settings in (WEAK, STRONG):
        out = augment(flat, settings, np.random.default_rng(0))
        inside = out[0, 12:20, 12:20]
        assert torch.allclose(inside, torch.full_like(inside, 0.4), atol=1e-5)
    bright = view_augmentation("weak", intensity=True)
    assert bright.brightness == INTENSITY_RANGE
    changed = [float(augment(flat, bright, np.random.default_rng(s))[0, 16, 16]) for s in range(5)]
    assert max(abs(v - 0.4) for v in changed) > 0.05


def test_validation_is_deterministic_whole_text_no_augmentation(tmp_path):
    import numpy as np
    from PIL import Image

    from zeroshot_ild_train.data import MontagePairDataset, PairRecord, load_montage

    image = tmp_path / "m.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)).save(image)
    report = "FINDINGS: One. Two. Three. Four.\nIMPRESSION: Five. Six. Seven. Eight."
    record = PairRecord(str(image), report, scan_id="a")
    val = MontagePairDataset([record], image_size=32, views=("weak", "strong1"), text_choice="findings+impression",
                             sentences_per_sample=3, evaluation=True)
    train = MontagePairDataset([record], image_size=32, views=("weak",), text_choice="findings+impression",
                               sentences_per_sample=3)
    item = val[0]
    assert item["text"].count(".") == 8
    for view in item["views"].values():
        assert np.array_equal(view.numpy(), load_montage(str(image), 32).numpy())
    assert train[(0, 0)]["text"].count(".") == 3


def test_config_file_and_print_config(capsys, tmp_path):
    code, out, err = run(capsys, "train", "m.csv", "--cache", "c", "--out", "o", "--lr", "3e-4", "--print-config")
    assert code == 0, err
    settings = yaml.safe_load(out)
    assert settings["lr"] == 3e-4 and settings["text_choice"] == "impression" and settings["sentences"] == 0
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump({**settings, "max_steps": 7}), encoding="utf-8")
    code, out, err = run(capsys, "train", "--config", file, "--lr", "1e-3", "--print-config")
    assert code == 0, err
    again = yaml.safe_load(out)
    assert again["manifest"] == "m.csv" and again["max_steps"] == 7 and again["lr"] == 1e-3
    file.write_text("lr: 1e-3\nlearning_rat: 2\n", encoding="utf-8")
    code, out, err = run(capsys, "train", "m.csv", "--cache", "c", "--out", "o", "--config", file)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "learning_rat" in err
    code, out, err = run(capsys, "split", "m.csv", "--out", "s.csv", "--print-config")
    assert code == 0 and yaml.safe_load(out)["val_fraction"] == 0.1


def test_resume_refuses_changed_flags_and_extends_a_finished_run(capsys, cohort, tmp_path):
    out = tmp_path / "run"
    common = [cohort["manifest"], "--cache", cohort["cache"], "--out", out, *TRAIN, "--lr", "1e-6"]
    assert run(capsys, "train", *common, "--max-steps", "2")[0] == 0
    code, _, err = run(capsys, "train", *common[:-2], "--lr", "1e-3", "--loss", "unicl", "--max-steps", "2", "--resume")
    assert code == 2 and "loss (clip -> unicl)" in err and "learning_rate" in err and len(err.strip().splitlines()) == 1
    assert summary(out)["config"]["loss"] == "clip"
    code, stdout, err = run(capsys, "train", *common, "--max-steps", "4", "--resume")
    assert code == 0, err
    assert summary(out)["result"]["global_step"] == 4
    assert [p.name for p in (out / "logs").iterdir()] == ["metrics.csv"]  # no version_1 after resume
    with open(out / "logs" / "metrics.csv", newline="", encoding="utf-8") as handle:
        steps = {int(r["step"]) for r in csv.DictReader(handle) if r.get("val_loss")}
    # The base model (0) and the validations of both parts of the run, in one file, numbered as the checkpoints.
    assert {0, 2, 4} <= steps


def test_ensemble_paths_are_relative_and_a_copied_run_evaluates(capsys, cohort, tmp_path):
    import shutil

    from ZeroShotILDLib.ensemble import read_ensemble

    out = tmp_path / "run"
    assert run(capsys, "train", cohort["manifest"], "--cache", cohort["cache"], "--out", out, *TRAIN,
               "--max-steps", "2", "--top-k", "2")[0] == 0
    payload = json.loads((out / "ensemble.json").read_text(encoding="utf-8"))
    assert payload["checkpoints"] and not any(Path(c["path"]).is_absolute() for c in payload["checkpoints"])
    copy = tmp_path / "moved"
    shutil.copytree(out, copy)
    shutil.rmtree(out)
    members = read_ensemble(copy / "ensemble.json")
    assert members and all(Path(m[len("dapt:"):]).is_file() and str(copy) in m for m in members)


def test_relaxed_run_reports_how_often_the_relaxation_was_active(capsys, cohort, tmp_path):
    out = tmp_path / "relaxed"
    code, stdout, err = run(capsys, "train", cohort["manifest"], "--cache", cohort["cache"], "--out", out, *TRAIN,
                            "--max-steps", "2", "--loss", "relaxed", "--lr", "1e-7")
    assert code == 0, err
    relaxation = summary(out)["result"]["relaxation"]
    assert relaxation["pairs"] == 2 * 4 and relaxation["steps"] == 2
    assert 0.0 <= relaxation["pair_fraction"] <= 1.0 and "relaxation active for" in stdout
    assert summary(out)["result"]["relaxation"] is not None
    plain = tmp_path / "plain"
    assert run(capsys, "train", cohort["manifest"], "--cache", cohort["cache"], "--out", plain, *TRAIN,
               "--max-steps", "1")[0] == 0
    assert summary(plain)["result"]["relaxation"] is None


def test_slurm_auto_requeue_plugin(monkeypatch):
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)
    assert dapt._slurm_plugins() == [] and not dapt._slurm_requeued()
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    plugins = dapt._slurm_plugins()
    assert len(plugins) == 1 and isinstance(plugins[0], SLURMEnvironment) and plugins[0].auto_requeue
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert dapt._slurm_requeued()


def _training_subprocess(cohort, out: Path) -> tuple:
    """(argv, env, process): a real `python -m zeroshot_ild_train train` run of 200 steps, returned once it is training."""
    argv = [sys.executable, "-m", "zeroshot_ild_train", "train", str(cohort["manifest"]), "--cache", str(cohort["cache"]),
            "--out", str(out), *TRAIN, "--max-steps", "200", "--val-every", "1000", "--lr", "1e-6"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    # Wait until training steps are being taken (the CSV logger flushes its first rows).
    while time.time() < deadline and process.poll() is None:
        if (out / "logs").is_dir() and any((out / "logs").iterdir()):
            time.sleep(2.0)
            break
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()
    return argv, env, process


def test_sigterm_mid_run_exits_143_and_resume_finishes_the_same_run(cohort, tmp_path):
    out = tmp_path / "run"
    argv, env, process = _training_subprocess(cohort, out)
    metrics = out / "logs" / "metrics.csv"
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 143, stderr
    lines = [line for line in stderr.splitlines() if "resume with --resume" in line]
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "Traceback" not in stderr
    state = dapt.read_lightning_checkpoint(out / "checkpoints" / "last.ckpt")
    stopped_at = int(state["global_step"])
    assert 0 < stopped_at < 200
    interrupted = summary(out)["result"]
    assert interrupted["interrupted"] == "SIGTERM" and interrupted["global_step"] == stopped_at
    del metrics
    # Resuming finishes the same run, to its planned length.
    done = subprocess.run(argv + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = summary(out)["result"]
    assert result["global_step"] == 200 and result["interrupted"] is None and Path(result["best_checkpoint"]).is_file()


@pytest.mark.parametrize("logger,module", [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_missing_logger_is_one_line_before_any_work(capsys, cohort, tmp_path, logger, module):
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    code, _, err = run(capsys, "train", cohort["manifest"], "--cache", cohort["cache"], "--out", tmp_path / "r", *TRAIN,
                       "--max-steps", "1", "--logger", logger)
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"pip install {module}" in err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_epoch_limit_that_cuts_max_steps_says_so(capsys, caplog, cohort, tmp_path):
    out = tmp_path / "r"
    code, stdout, err = run(capsys, "train", cohort["manifest"], "--cache", cohort["cache"], "--out", out, *TRAIN,
                            "--max-steps", "5", "--max-epochs", "1", "--lr", "1e-7")
    assert code == 0, err
    assert summary(out)["result"]["global_step"] == 2 and summary(out)["limited_by"] == "max_epochs"
    assert "length set by max-epochs" in stdout
    assert any("--max-epochs 1 ends the run at 2 steps, before --max-steps 5" in r.getMessage() for r in caplog.records)


def test_text_less_labelled_validation_pairs_feed_the_auroc_only(tmp_path):
    import dataclasses as dc
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).parent))
    from test_dapt import config, make_pairs

    pairs = make_pairs(tmp_path, count=16)
    pairs = [dc.replace(p, ild=int(p.labels[0]), split="val" if i >= 12 else "train") for i, p in enumerate(pairs)]
    # Validation: two pairs with text, two labelled images without.
    pairs[14] = dc.replace(pairs[14], report="")
    pairs[15] = dc.replace(pairs[15], report="")
    result = dapt.fit(config(tmp_path / "run", max_steps=1, val_every_steps=1, class_names=()), pairs)
    last = result.health["last"]
    assert last["val_chance"] == pytest.approx(math.log(2))  # the loss saw the two pairs with text
    assert "val_auroc" in last and "val_mean_cosine" in last
    with pytest.raises(dapt.InputError, match="no validation pair has a report"):
        dapt.fit(config(tmp_path / "none", max_steps=1, class_names=()),
                 [dc.replace(p, report="") if p.split == "val" else p for p in pairs])


def test_metrics_csv_is_on_disk_at_every_validation(tmp_path):
    import sys as _sys

    import lightning as L

    _sys.path.insert(0, str(Path(__file__).parent))
    from test_dapt import config, make_pairs

    class Reader(L.Callback):
        seen: list = []

        def on_validation_end(self, trainer, module):
            if trainer.sanity_checking:
                return
            path = tmp_path / "run" / "logs" / "metrics.csv"
            with open(path, newline="", encoding="utf-8") as handle:
                self.seen.append(sum(1 for r in csv.DictReader(handle) if r.get("val_loss")))

    reader = Reader()
    dapt.fit(config(tmp_path / "run", max_steps=4, val_every_steps=2, class_names=()), make_pairs(tmp_path, count=16),
             callbacks=[reader])
    assert reader.seen == [2, 3]  # the base model's row (step 0), then one more per validation


def test_print_config_for_nested_commands(capsys):
    code, out, err = run(capsys, "reader-study", "export", "m.csv", "--out", "o", "--print-config")
    assert code == 0, err
    assert yaml.safe_load(out)["manifest"] == "m.csv"


def test_sweep_ranks_runs_at_chance_or_collapsed_after_healthy_ones(monkeypatch, tmp_path):
    from zeroshot_ild_train.data import PairRecord

    verdicts = {1e-3: (2.770, {"at_chance": True, "collapsed": False}),
                1e-4: (2.771, {"at_chance": True, "collapsed": False}),
                1e-5: (2.900, {"at_chance": False, "collapsed": False})}

    def fake_fit(config, records, **kwargs):
        score, health = verdicts[config.learning_rate]
        return dapt.FitResult(output_dir=config.output_dir, best_checkpoint="b", best_val_loss=score, best_score=score,
                              health=dict(health))

    monkeypatch.setattr(dapt, "fit", fake_fit)
    records = [PairRecord("x", "t", scan_id=str(i), split="val" if i < 2 else "train") for i in range(6)]
    config = dapt.DaptConfig(output_dir=str(tmp_path / "s"))
    result = dapt.sweep(config, records, learning_rates=list(verdicts))
    assert result.best_learning_rate == 1e-5
    del verdicts[1e-5]
    result = dapt.sweep(dapt.DaptConfig(output_dir=str(tmp_path / "t")), records, learning_rates=list(verdicts))
    assert result.best_learning_rate == 1e-3
    payload = json.loads(Path(result.summary_json).read_text(encoding="utf-8"))
    assert "none of them is learning" in payload["warning"] and payload["runs"][0]["at_chance"] is True


def test_sigint_mid_run_exits_130_with_a_resumable_checkpoint(cohort, tmp_path):
    out = tmp_path / "run"
    _, _, process = _training_subprocess(cohort, out)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 130, stderr
    assert len([line for line in stderr.splitlines() if "resume with --resume" in line and "SIGINT" in line]) == 1
    assert "Traceback" not in stderr
    assert 0 < int(dapt.read_lightning_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"]) < 200
    assert summary(out)["result"]["interrupted"] == "SIGINT"


class _CollapseAt:
    """Make the validation at ``step`` a collapsed one with the lowest loss of the run: what a
    collapse looks like when it pulls the loss towards chance from above (issue 24, paper001)."""

    def __init__(self, step: int):
        import lightning as L

        class Callback(L.Callback):
            def on_validation_end(cb, trainer, pl_module):
                import torch

                if trainer.sanity_checking or trainer.global_step != step:
                    return
                _, metrics = pl_module.health_history[-1]
                metrics["val_mean_cosine"], metrics["val_loss"] = 0.999, 0.01
                initial = pl_module.health_history[0][1]
                pl_module.current_verdict = dapt.validation_verdict(metrics, initial, pl_module.config, step=step)
                trainer.callback_metrics["val_loss"] = torch.tensor(0.01)

        self.callback = Callback()


def test_a_collapsed_lowest_loss_checkpoint_is_never_best(monkeypatch, capsys, caplog, cohort, tmp_path):
    from ZeroShotILDLib.models import read_checkpoint_metadata

    collapse = _CollapseAt(4)
    real_fit = dapt.fit
    monkeypatch.setattr(dapt, "fit", lambda config, pairs, **kw: real_fit(config, pairs, callbacks=[collapse.callback], **kw))
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", cohort["manifest"], "--cache", cohort["cache"], *TRAIN, "--max-steps", "6",
                            "--out", out, "--lr", "1e-7")
    assert code == 0, err
    result = summary(out)["result"]
    verdicts = {v["step"]: v for v in result["health"]["verdicts"]}
    assert verdicts[4]["collapsed"] and not verdicts[4]["healthy"]
    assert verdicts[2]["healthy"] and verdicts[6]["healthy"]
    # Step 4 has the lowest validation loss, but it is not best, not in the ensemble.
    assert result["top_k"][0]["step"] != 4 and 4 not in [c["step"] for c in result["top_k"]]
    ensemble = json.loads((out / "ensemble.json").read_text(encoding="utf-8"))
    assert 4 not in [c["step"] for c in ensemble["checkpoints"]]
    assert all(c["healthy"] for c in ensemble["checkpoints"])
    best = read_checkpoint_metadata(out / "best.safetensors")["training"]
    assert best["health"]["collapsed"] is False and best["health"]["healthy"] is True
    assert best["health"]["step"] == best["global_step"] != 4
    assert best["health"]["val_chance"] == pytest.approx(math.log(4))
    collapsed_file = next((out / "checkpoints").glob("step0000004-*.safetensors"))
    assert read_checkpoint_metadata(collapsed_file)["training"]["health"]["collapsed"] is True
    warnings = [r.getMessage() for r in caplog.records if "not learning" in r.getMessage()]
    assert len(warnings) == 1 and "collapsed at step 4" in warnings[0] and "best is the healthy step" in warnings[0]


def test_a_run_without_a_healthy_validation_says_so(capsys, caplog, cohort, tmp_path):
    from ZeroShotILDLib.models import read_checkpoint_metadata

    out = tmp_path / "collapsed"
    code, _, err = run(capsys, "train", cohort["manifest"], "--cache", cohort["cache"], *TRAIN, "--max-steps", "4",
                       "--out", out, "--lr", "1.0")
    assert code == 0, err
    health = summary(out)["result"]["health"]
    assert health["healthy_steps"] == [] and health["best_healthy"] is False
    warnings = [r.getMessage() for r in caplog.records if "not learning" in r.getMessage()]
    assert len(warnings) == 1 and "no validation was healthy" in warnings[0] and "lower --lr" in warnings[0]
    # The fallback best says in its own metadata that it is not healthy: the engine flags its scores.
    recorded = read_checkpoint_metadata(out / "best.safetensors")["training"]["health"]
    assert recorded["healthy"] is False
    from ZeroShotILDLib.results import model_warning

    assert "did not learn" in model_warning("dapt:best", random_weights=False, trained_on="ct", is_phantom=False,
                                            training_health=recorded)


def test_a_ten_step_run_reaches_its_peak_learning_rate(capsys, cohort, tmp_path):
    from zeroshot_ild_train.dapt_config import warmup_for

    out = tmp_path / "short"
    code, _, err = run(capsys, "train", cohort["manifest"], "--cache", cohort["cache"], *[a for a in TRAIN if a not in ("--warmup-steps", "1")],
                       "--max-steps", "10", "--val-every", "5", "--out", out, "--lr", "1e-5")
    assert code == 0, err
    with open(out / "logs" / "metrics.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    train_rows = [r for r in rows if r.get("lr")]
    lrs = [float(r["lr"]) for r in train_rows]
    assert len(lrs) == 10 and max(lrs) == pytest.approx(1e-5)
    assert summary(out)["warmup_steps"] == 1
    # Rows are numbered like the checkpoints: base model 0, training steps 1..10, validations 5 and 10.
    assert [int(r["step"]) for r in train_rows] == list(range(1, 11))
    val_steps = [int(r["step"]) for r in rows if r.get("val_loss")]
    assert val_steps == [0, 5, 10]
    checkpoint_steps = sorted(int(p.name[4:11]) for p in (out / "checkpoints").glob("step*.safetensors")
                              if not p.name.endswith(".labelhead.safetensors"))
    assert set(checkpoint_steps) <= {5, 10} and checkpoint_steps
    assert all(float(r["samples_per_s"]) > 0 for r in train_rows)
    assert (out / "curves.png").stat().st_size > 0
    # The default warm-up scales with the run; an explicit one longer than the run is one line.
    config = dapt.DaptConfig(output_dir="x")
    assert (warmup_for(config, 10), warmup_for(config, 5000)) == (1, 100)
    code, _, err = run(capsys, "train", cohort["manifest"], "--cache", cohort["cache"], *TRAIN[:-1], "--max-steps", "4",
                       "--warmup-steps", "100", "--out", tmp_path / "refused", "-q")
    assert code == 2 and "longer than the run's 4 steps" in err and len(err.strip().splitlines()) == 1


def test_validation_auroc_on_a_non_ild_label_with_its_own_prompt(capsys, cohort, tmp_path):
    from ZeroShotILDLib.models import read_checkpoint_metadata

    # No ild column at all: a "normal" label (the opposite of ILD), scored with its own prompt.
    rows = []
    for r in read_rows(cohort["manifest"]):
        r = dict(r)
        r["label_normal"] = "0" if r.pop("ild") == "1" else "1"
        rows.append(r)
    manifest = write_rows(cohort["folder"] / "normal.csv", rows)  # scan paths are relative to it
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", manifest, "--cache", cohort["cache"], *TRAIN, "--max-steps", "2",
                            "--out", out, "--lr", "1e-7", "--label", "normal", "--prompt", "normal lungs",
                            "--monitor", "val_auroc")
    assert code == 0, err
    data = summary(out)
    assert data["config"]["val_label"] == "normal" and data["config"]["val_prompt"] == "normal lungs"
    assert 0.0 <= data["result"]["health"]["last"]["val_auroc"] <= 1.0
    assert data["result"]["best_score"] == pytest.approx(data["result"]["health"]["last"]["val_auroc"])
    assert dapt.validation_prompts(dapt.DaptConfig(output_dir="x", val_label="normal", val_prompt="normal lungs")) == \
        ("normal lungs", "no normal lungs")
    assert dapt.validation_prompts(dapt.DaptConfig(output_dir="x", val_label="covid")) == ("covid", "no covid")
    assert read_checkpoint_metadata(out / "best.safetensors")["training"]["val_label"] == "normal"
    # A label the manifest does not have is one line.
    code, _, err = run(capsys, "train", manifest, "--cache", cohort["cache"], *TRAIN, "--max-steps", "2",
                       "--out", tmp_path / "typo", "--label", "nromal")
    assert code == 2 and "no label 'nromal'" in err


def test_resume_needs_a_run_and_every_run_leaves_a_record(capsys, cohort, tmp_path):
    from zeroshot_ild_train import run_record

    out = tmp_path / "run"
    common = [cohort["manifest"], "--cache", cohort["cache"], *TRAIN, "--lr", "1e-7"]
    code, _, err = run(capsys, "train", *common, "--out", out, "--max-steps", "2", "--resume")
    assert code == 2 and "holds no run to resume" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # a refused run leaves no folder behind
    assert run(capsys, "train", *common, "--out", out, "--max-steps", "2")[0] == 0
    record = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert record["command"] == "train" and "--max-steps" in record["argv"] and record["exit_code"] == 0
    assert {"python", "torch", "lightning"} <= set(record["versions"])
    assert record["git"] is None or len(record["git"]["commit"]) == 40
    saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert saved["max_steps"] == 2 and saved["lr"] == pytest.approx(1e-7)
    index = run_record.read_index(tmp_path)
    assert [(r["command"], r["out"], r["exit_code"]) for r in index] == [("train", "run", "0")]
    assert index[0]["headline"].startswith("best val_loss")
    # The index is read from the run folders: nothing is written beside --out.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    code, listed, _ = run(capsys, "runs", tmp_path)
    assert code == 0 and "train" in listed and "run" in listed
    # The saved settings continue the run without retyping its flags.
    code, _, err = run(capsys, "train", "--config", out / "config.yaml", "--max-steps", "4", "--resume")
    assert code == 0, err
    assert summary(out)["result"]["global_step"] == 4
    index = run_record.read_index(tmp_path)
    assert [r["command"] for r in index] == ["train"]  # one folder, one row: its latest command
    record = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert "--resume" in record["argv"] and record["previous"][0]["exit_code"] == 0


def test_an_unhealthy_validation_does_not_reset_early_stopping_patience():
    import torch

    stop = dapt.HealthAwareEarlyStopping(monitor="val_loss", mode="min", patience=2)
    stop.verdict = {"healthy": False}
    assert stop._evaluate_stopping_criteria(torch.tensor(0.5)) == (False, None)  # nothing healthy yet
    stop.verdict = {"healthy": True}
    stop._evaluate_stopping_criteria(torch.tensor(1.0))
    assert float(stop.best_score) == 1.0 and stop.wait_count == 0
    stop.verdict = {"healthy": False}  # a collapse with a lower loss: no improvement
    should_stop, _ = stop._evaluate_stopping_criteria(torch.tensor(0.01))
    assert float(stop.best_score) == 1.0 and stop.wait_count == 1 and not should_stop
    should_stop, _ = stop._evaluate_stopping_criteria(torch.tensor(0.01))
    assert should_stop and float(stop.best_score) == 1.0
