"""Ensembles of checkpoints (``ensemble:<ensemble.json>``): probabilities averaged over members."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_settings
from ZeroShotILDLib import models
from ZeroShotILDLib.ensemble import EnsembleAnalyzer, make_analyzer, read_ensemble
from ZeroShotILDLib.errors import InputError
from ZeroShotILDLib.pipeline import Analyzer


@pytest.fixture(scope="module")
def ensemble_json(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    entries = []
    for i in range(2):
        member = models.load_model("tiny-random", device="cpu")  # a fresh copy, not the shared fixture
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():  # two different members
            for p in member.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        path = models.save_checkpoint(folder / f"step{i}.safetensors", member.model, member.spec)
        entries.append({"path": path.name if i else str(path), "val_loss": 1.0 + i, "step": 100 * (i + 1)})
    file = folder / "ensemble.json"
    file.write_text(json.dumps({"format": "zeroshot-ild-ensemble/1", "checkpoints": entries}), encoding="utf-8")
    return file


def test_members_are_read_best_first_with_relative_paths_resolved(ensemble_json):
    members = read_ensemble(f"ensemble:{ensemble_json}")
    assert [m.split("/")[-1] for m in members] == ["step0.safetensors", "step1.safetensors"]
    assert all(m.startswith("dapt:/") for m in members)


def test_probabilities_are_the_members_means(ensemble_json, small_scan):
    settings = tiny_settings(model=f"ensemble:{ensemble_json}")
    analyzer = make_analyzer(settings)
    assert isinstance(analyzer, EnsembleAnalyzer)
    result = analyzer.analyze(small_scan)
    singles = [Analyzer(tiny_settings(model=m)).analyze(small_scan) for m in analyzer.members]
    for key, value in result.finding_probabilities.items():
        assert value == pytest.approx(np.mean([s.finding_probabilities[key] for s in singles]), abs=1e-6)
    for key, value in result.subtype_probabilities.items():
        assert value == pytest.approx(np.mean([s.subtype_probabilities[key] for s in singles]), abs=1e-6)
    # The montage shown is the best member's own.
    np.testing.assert_array_equal(result.montage_indices, singles[0].montage_indices)
    assert any("ensemble of 2" in n for n in result.notes)

    before = [a.encoder.images_encoded for a in analyzer.analyzers]
    again = analyzer.reprompt(["honeycombing"])
    assert set(again.finding_probabilities) == {"honeycombing"}
    # Each member encodes only its new montage, never the patches again.
    assert [a.encoder.images_encoded - b for a, b in zip(analyzer.analyzers, before)] == [1, 1]


@pytest.mark.parametrize("content, words", [
    (None, "does not exist"),
    ("not json", "is not an ensemble.json"),
    ('{"checkpoints": []}', "lists no checkpoints"),
    ('{"format": "other/9", "checkpoints": [{"path": "a"}]}', "format"),
])
def test_bad_ensemble_files_are_refused(tmp_path, content, words):
    file = tmp_path / "ensemble.json"
    if content is not None:
        file.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=words):
        read_ensemble(file)
