"""DAPT with the tiny random model on CPU: data, one step per loss, resume, export, sweep.

Every run here is a few optimizer steps on 64 px montages with batches of 4, so the whole file
takes well under a minute on two cores.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from zeroshot_ild_train import dapt
from zeroshot_ild_train.data import (EVAL_EPOCH, STRONG, WEAK, GlobalBatchSampler, MontagePairDataset, PairRecord, augment,
                           pairs_from_manifest)
from ZeroShotILDLib.errors import InputError
from ZeroShotILDLib.models import load_model, read_checkpoint_metadata

REPORT = ("FINDINGS:\nLUNG PARENCHYMA: {a} reticulation in the lower lobes. Traction bronchiectasis {b}.\n"
          "PLEURA: No effusion.\nHEART: Normal size.\nIMPRESSION: {c} fibrotic lung disease. Follow-up advised.")


def make_pairs(folder: Path, count: int = 24, size: int = 64, seed: int = 0) -> list:
    """Montage-like PNGs (bright blobs on black, more in 'fibrotic' cases) with matching reports."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    pairs = []
    for i in range(count):
        fibrotic = i % 2 == 0
        image = rng.normal(60, 10, (size, size))
        for _ in range(6 if fibrotic else 2):
            cy, cx, r = rng.integers(8, size - 8, 2).tolist() + [int(rng.integers(3, 7))]
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 200
        path = folder / f"montage_{i:03d}.png"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
        words = ("Marked", "present", "Extensive") if fibrotic else ("No", "absent", "No")
        pairs.append(PairRecord(str(path), REPORT.format(a=words[0], b=words[1], c=words[2]),
                                labels=(float(fibrotic), float(not fibrotic)), scan_id=f"scan{i}",
                                patient_id=f"patient{i // 2}", source=f"row {i}"))
    return pairs


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("montages"))


def config(out: Path, **overrides) -> dapt.DaptConfig:
    base = dict(output_dir=str(out), model="tiny-random", batch_size=4, max_steps=2, val_every_steps=2,
                warmup_steps=1, learning_rate=1e-3, num_workers=0, progress_bar=False, accelerator="cpu",
                class_names=("fibrosis", "no fibrosis"), val_fraction=0.2)
    base.update(overrides)
    return dapt.DaptConfig(**base)


class Probe(L.Callback):
    """Pushes logit_scale above its clamp before training and records what the step did."""

    def on_train_start(self, trainer, module):
        self.module = module
        if trainer.global_step == 0:  # not when resuming: that would change the restored state
            with torch.no_grad():
                module.clip.logit_scale.fill_(5.0)  # > ln(100) = 4.605
                if module.label_head is not None:
                    module.label_head.logit_scale.fill_(5.0)
        self.before = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.losses = []
        self.seen = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.append((trainer.global_step, batch["index"].tolist(), list(batch["text"])))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def test_augment_is_reproducible_and_in_range():
    image = torch.rand(1, 64, 64)
    a = augment(image, WEAK, np.random.default_rng(3))
    b = augment(image, WEAK, np.random.default_rng(3))
    c = augment(image, STRONG, np.random.default_rng(4))
    assert a.shape == c.shape == (1, 64, 64)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_dataset_items_depend_on_seed_epoch_and_index_only(pairs):
    ds = MontagePairDataset(pairs, image_size=64, views=("original", "weak", "strong1"), num_classes=2,
                            sentences_per_sample=3, seed=7)
    first, again = ds[(5, 0)], ds[(5, 0)]
    assert first["text"] == again["text"]
    for name in ("original", "weak", "strong1"):
        assert torch.equal(first["views"][name], again["views"][name])
        assert first["views"][name].shape == (1, 64, 64)
    later = ds[(5, 1)]
    assert not torch.equal(first["views"]["weak"], later["views"]["weak"])
    assert torch.equal(first["views"]["original"], later["views"]["original"])
    # Three of the report's FINDINGS + IMPRESSION sentences, in report order.
    sentences = ds.sentences[5]
    assert len(sentences) > 3
    picked = [s for s in sentences if s in first["text"]]
    assert len(picked) == 3 and " ".join(picked) == first["text"]
    assert first["labels"].tolist() == list(pairs[5].labels)
    assert first["has_text"] and first["valid"]
    # Validation items (plain index) are the same in every round.
    assert ds[5]["text"] == ds[(5, EVAL_EPOCH)]["text"]


def test_global_batches_are_independent_of_the_number_of_ranks():
    one = list(GlobalBatchSampler(10, batch_size=4, world_size=1, rank=0, seed=1, drop_last=True))
    two = [list(GlobalBatchSampler(10, batch_size=2, world_size=2, rank=r, seed=1, drop_last=True)) for r in (0, 1)]
    assert len(one) == 2
    assert [a + b for a, b in zip(*two)] == one
    # Resuming after one batch continues with the second.
    resumed = list(GlobalBatchSampler(10, batch_size=4, seed=1, progress=lambda: (0, 1)))
    assert resumed == one[1:]
    # Another epoch, another order.
    assert list(GlobalBatchSampler(10, batch_size=4, seed=1, progress=lambda: (1, 0))) != one
    # A final validation batch of one item on two ranks: rank 1 gets a padding key.
    val = [list(GlobalBatchSampler(5, batch_size=2, world_size=2, rank=r, shuffle=False, drop_last=False,
                                   epoch_key=False)) for r in (0, 1)]
    assert val[0][-1] == [(4, EVAL_EPOCH)]
    assert val[1][-1] == [(4, EVAL_EPOCH, False)]


def test_pairs_from_manifest_builds_label_vectors(tmp_path):
    from zeroshot_ild_train.manifest import ManifestRecord

    records = [
        ManifestRecord(scan_path=tmp_path, scan_id="a", report_text="IMPRESSION: UIP.", ild=1,
                       subtype="Idiopathic pulmonary fibrosis", labels={"emphysema": 0}),
        ManifestRecord(scan_path=tmp_path, scan_id="b", report_text="IMPRESSION: Normal.", ild=0,
                       labels={"emphysema": 1}, patient_id="p2", split="val"),
    ]
    out = pairs_from_manifest(records, {"a": "a.png", "b": "b.png"})
    assert out[0].labels == (1.0, 0.0, 1.0, 0.0)  # ild, no ild, the subtype, emphysema
    assert out[1].labels == (0.0, 1.0, 0.0, 1.0)
    assert (out[1].split, out[1].patient_key) == ("val", "p2")
    with pytest.raises(InputError, match="no cached montage"):
        pairs_from_manifest(records, {"a": "a.png"})


def test_config_errors_are_one_line(tmp_path, pairs):
    with pytest.raises(InputError, match="unknown loss"):
        dapt.fit(config(tmp_path / "x", loss="triplet"), pairs)
    with pytest.raises(InputError, match="needs labels"):
        dapt.fit(config(tmp_path / "y", loss="unicl", class_names=()), pairs)
    with pytest.raises(InputError, match="needs a CUDA GPU"):
        dapt.resolve_precision("bf16-mixed", "cpu")
    assert dapt.resolve_precision("auto", "cpu") == "32-true"
    no_text = [PairRecord(p.image_path, "", p.labels, p.scan_id, p.patient_id) for p in pairs]
    with pytest.raises(InputError, match="have no report"):
        dapt.fit(config(tmp_path / "z"), no_text)


# ---------------------------------------------------------------------------------------------
# One step of every loss
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", dapt.LOSSES)
def test_one_step_per_loss(tmp_path, pairs, loss):
    probe = Probe()
    result = dapt.fit(config(tmp_path / loss, loss=loss, max_steps=1, val_every_steps=1), pairs, callbacks=[probe])
    module = probe.module
    assert len(probe.losses) == 1 and math.isfinite(probe.losses[0])
    after = module.state_dict()
    changed = [k for k, v in probe.before.items() if not torch.equal(v, after[k])]
    assert "clip.visual.conv1.weight" in changed and "clip.token_embedding.weight" in changed
    assert float(module.clip.logit_scale.detach()) <= math.log(100) + 1e-6
    if loss == "dlilp":
        assert float(module.label_head.logit_scale.detach()) <= math.log(100) + 1e-6
        assert "label_head.prototypes" in changed
    assert result.global_step == 1 and result.best_val_loss is not None and math.isfinite(result.best_val_loss)
    assert Path(result.best_checkpoint).is_file() and Path(result.resume_checkpoint).is_file()
    ensemble = json.loads(Path(result.ensemble_json).read_text(encoding="utf-8"))
    # Stored relative to ensemble.json's folder; FitResult gives them absolute.
    folder = Path(result.ensemble_json).parent
    assert not any(Path(c["path"]).is_absolute() for c in ensemble["checkpoints"])
    assert [str((folder / c["path"]).resolve()) for c in ensemble["checkpoints"]] == [c["path"] for c in result.top_k]


# ---------------------------------------------------------------------------------------------
# Export, resume, sweep
# ---------------------------------------------------------------------------------------------
def test_exported_checkpoint_loads_in_the_engine(tmp_path, pairs):
    probe = Probe()
    result = dapt.fit(config(tmp_path / "run", loss="dlilp", max_steps=3, val_every_steps=2), pairs, callbacks=[probe])
    module = probe.module.eval()
    # The final step is validated and exported even though 3 is not a multiple of 2.
    assert {c["step"] for c in result.top_k} == {2, 3}
    last = Path(result.last_checkpoint)
    engine = load_model(f"dapt:{last}", device="cpu")
    pixels = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        expected = module.clip.encode_image(module.normalize(pixels))
        got = engine.model.encode_image(engine.normalize(pixels))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    meta = read_checkpoint_metadata(last)
    assert meta["base_model"] == "tiny-random"
    assert meta["training"]["loss"] == "dlilp" and meta["training"]["global_step"] == 3
    assert meta["training"]["class_names"] == ["fibrosis", "no fibrosis"]
    # The DLILP head beside it gives the module's zero-shot class probabilities.
    head = dapt.load_label_head(last)
    assert head.class_names == ("fibrosis", "no fibrosis")
    with torch.no_grad():
        features = torch.nn.functional.normalize(expected, dim=-1)
        torch.testing.assert_close(head.class_probabilities(features),
                                   module.label_head.class_probabilities(expected), rtol=1e-5, atol=1e-6)
    # Every top-k file is an engine checkpoint; best.safetensors is the lowest validation loss.
    assert result.best_val_loss == min(c["val_loss"] for c in result.top_k)
    for entry in result.top_k:
        load_model(f"dapt:{entry['path']}", device="cpu")
    # Converting the Lightning resume file gives the same weights.
    exported = dapt.export(result.resume_checkpoint, tmp_path / "converted.safetensors")
    a, b = load_file(str(exported)), load_file(str(last))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path, pairs):
    class Interrupt(Exception):
        pass

    class CrashAfter(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 5:  # the last checkpoint is at step 4, mid-epoch 1
                raise Interrupt()

    # 19 training pairs / batch 4 = 4 steps per epoch: 7 steps span two epochs; one data worker
    # so that prefetching is exercised.
    settings = dict(loss="slip", max_steps=7, val_every_steps=2, num_workers=1)
    straight, first, second = Probe(), Probe(), Probe()
    a = dapt.fit(config(tmp_path / "straight", **settings), pairs, callbacks=[straight])
    with pytest.raises(Interrupt):
        dapt.fit(config(tmp_path / "resumed", **settings), pairs, callbacks=[first, CrashAfter()])
    with pytest.raises(InputError, match="--resume"):
        dapt.fit(config(tmp_path / "resumed", **settings), pairs)
    b = dapt.fit(config(tmp_path / "resumed", **settings), pairs, resume=True, callbacks=[second])

    assert [s for s, *_ in first.seen] == [0, 1, 2, 3, 4]
    assert [s for s, *_ in second.seen] == [4, 5, 6]  # continues after the step-4 checkpoint
    assert second.seen == straight.seen[4:]  # same samples and sentences
    wa = load_file(a.last_checkpoint)
    wb = load_file(b.last_checkpoint)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=1e-6)
    assert [(c["step"], round(c["val_loss"], 6)) for c in a.top_k] == [(c["step"], round(c["val_loss"], 6)) for c in b.top_k]
    assert b.global_step == 7
    # Resuming a finished run does no further training.
    again = dapt.fit(config(tmp_path / "resumed", **settings), pairs, resume=True)
    assert again.best_checkpoint == b.best_checkpoint and again.global_step == 7


def test_sweep_picks_the_lowest_validation_loss(tmp_path, pairs):
    assert dapt.default_learning_rates() == pytest.approx([1e-5, 10 ** -4.5, 1e-4, 10 ** -3.5, 1e-3])
    result = dapt.sweep(config(tmp_path / "sweep", max_steps=2), pairs, learning_rates=[1e-5, 1e-2])
    losses = {rate: run.best_val_loss for rate, run in result.runs.items()}
    assert result.best_learning_rate == min(losses, key=losses.get)
    assert losses[1e-5] != losses[1e-2]
    summary = json.loads(Path(result.summary_json).read_text(encoding="utf-8"))
    assert summary["best_learning_rate"] == result.best_learning_rate
    assert len(Path(result.summary_csv).read_text(encoding="utf-8").strip().splitlines()) == 3
    assert Path(result.best.best_checkpoint).is_file()
