"""Training-side writers: strict JSON without NaN, staged result folders that only replace their own files."""
import json
import os
import stat
import subprocess
import sys

import pytest


def _strict(path):
    return json.loads(path.read_text(encoding="utf-8"),
                      parse_constant=lambda c: pytest.fail(f"{path} holds bare {c}: not JSON"))


def test_training_cli_json_has_no_nan(tmp_path):
    import numpy as np

    from zeroshot_ild_train.cli import _write_json

    doc = _strict(_write_json(tmp_path / "metrics.json", {"auroc": float("nan"), "ci": [np.float32("inf"), 0.5],
                                                          "n": np.int64(4)}))
    assert doc["auroc"] is None and doc["ci"] == [None, 0.5] and doc["n"] == 4
    assert "2 non-finite" in doc["notes"][0]


def test_dapt_json_has_no_nan(tmp_path):
    from zeroshot_ild_train.dapt import _write_json

    doc = _strict(_write_json(tmp_path / "sweep.json", {"best_val_loss": float("nan"), "runs": []}))
    assert doc == {"best_val_loss": None, "runs": []}


def test_staged_output_keeps_other_files_never_touches_lookalikes_and_follows_umask(tmp_path):
    from ZeroShotILDLib.errors import InputError
    from zeroshot_ild_train.cli import _staged_output, _write_rows

    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "scores.csv").write_text("the user's", encoding="utf-8")
    with pytest.raises(InputError, match="not a folder zeroshot-ild-train wrote"):
        with _staged_output(foreign):
            pass
    assert (foreign / "scores.csv").read_text(encoding="utf-8") == "the user's"
    out = tmp_path / "eval"
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    lookalike = tmp_path / f".eval.partial-{proc.pid}"  # the old staging name: a user's folder now
    (lookalike / "sub").mkdir(parents=True)
    (lookalike / "sub" / "my.txt").write_text("mine", encoding="utf-8")
    old = os.umask(0o022)
    try:
        with _staged_output(out) as tmp:
            assert tmp.parent == out.resolve()  # staging inside --out, never beside it
            (out / "my_notes.txt").write_text("mine", encoding="utf-8")
            _write_rows(tmp / "scores.csv", [{"a": 1}])
            (tmp / "plots").mkdir()
            _write_rows(tmp / "plots" / "x.csv", [{"b": 2}])
    finally:
        os.umask(old)
    assert (out / "my_notes.txt").read_text(encoding="utf-8") == "mine"
    assert (out / "scores.csv").read_text(encoding="utf-8").splitlines() == ["a", "1"]
    assert stat.S_IMODE((out / "scores.csv").stat().st_mode) == 0o644
    assert (lookalike / "sub" / "my.txt").read_text(encoding="utf-8") == "mine"
    assert sorted(p.name for p in out.iterdir()) == sorted([".zeroshot-ild-train-manifest.json", "my_notes.txt",
                                                            "plots", "scores.csv"])


def test_label_head_is_written_atomically_and_reads_back(tmp_path):
    import torch

    from zeroshot_ild_train.dapt import LabelHead, load_label_head, save_label_head

    head = LabelHead(8, ["ild", "normal"])
    path = save_label_head(tmp_path / "x.labelhead.safetensors", head)
    back = load_label_head(path)
    assert back.class_names == ("ild", "normal")
    assert torch.equal(back.projection.weight, head.projection.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["x.labelhead.safetensors"]  # no temporary file left
