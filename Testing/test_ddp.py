"""Two CPU processes (gloo): the loss over gathered features equals the single-process loss on the
same global batch, and DDP's averaged gradients equal the single-process gradients.

The first test drives ``zeroshot_ild_train.distributed`` and ``zeroshot_ild_train.losses`` directly with
``torch.multiprocessing``; the second runs ``dapt.fit`` with two Lightning processes
(``ddp_spawn``) against one process with the same global batch.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from zeroshot_ild_train import losses
from zeroshot_ild_train.distributed import all_gather_no_grad, all_gather_with_grad

GLOBAL = 5
RANK_ROWS = [(0, 3), (3, 5)]  # unequal shares exercise the padded gather
LOSS_NAMES = ("clip", "relaxed", "slip", "uniclip", "unicl", "dlilp")


class TinyTowers(torch.nn.Module):
    """Linear stand-ins for the two encoders, the DLILP head, prototypes and temperatures."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = torch.nn.Linear(6, 4)
        self.text = torch.nn.Linear(5, 4)
        self.label = torch.nn.Linear(4, 4, bias=False)
        self.prototypes = torch.nn.Parameter(torch.randn(2, 4))
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(5.0)))
        self.label_scale = torch.nn.Parameter(torch.tensor(math.log(3.0)))

    def forward(self, images, texts):
        raw = [self.image(x) for x in images]
        return {
            "views": [F.normalize(r, dim=-1) for r in raw],
            "text": F.normalize(self.text(texts), dim=-1),
            "label": F.normalize(self.label(raw[0]), dim=-1),
            # Returned from forward so DDP sees them used in this pass.
            "prototypes": self.prototypes * 1.0,
            "scale": self.logit_scale.exp(),
            "label_scale": self.label_scale.exp(),
        }


def global_batch():
    g = torch.Generator().manual_seed(42)
    return {
        "images": [torch.randn(GLOBAL, 6, generator=g) for _ in range(3)],
        "texts": torch.randn(GLOBAL, 5, generator=g),
        "labels": torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0], [1, 0]], dtype=torch.float32),
        "has_text": torch.tensor([True, False, True, True, True]),
    }


def loss_of(name, out, labels, has_text, gather=lambda t: t, gather_plain=lambda t: t):
    views = [gather(v) for v in out["views"]]
    text = gather(out["text"])
    scale = out["scale"]
    if name in ("clip", "relaxed"):
        return losses.clip_loss(views[0], text, scale, relaxed=name == "relaxed")
    if name == "slip":
        return losses.slip_loss(views[0], text, views[1], views[2], scale)
    if name == "uniclip":
        return losses.uniclip_loss(views[0], views[1], text, scale, relaxed=True)
    if name == "unicl":
        return losses.unicl_loss(views[0], text, gather_plain(labels), scale)
    return losses.dlilp_loss(gather(out["label"]), out["prototypes"], gather_plain(labels), views[0], text,
                             gather_plain(has_text), out["label_scale"], scale, text_weight=0.1)


def single_process_reference():
    model = TinyTowers()
    batch = global_batch()
    results = {}
    for name in LOSS_NAMES:
        model.zero_grad()
        out = model(batch["images"], batch["texts"])
        loss = loss_of(name, out, batch["labels"], batch["has_text"])
        loss.backward()
        results[name] = (float(loss.detach()),
                         {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    return results


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(TinyTowers(), find_unused_parameters=True)
        batch = global_batch()
        start, stop = RANK_ROWS[rank]
        local_images = [x[start:stop] for x in batch["images"]]
        results = {}
        for name in LOSS_NAMES:
            model.zero_grad()
            out = model(local_images, batch["texts"][start:stop])
            loss = loss_of(name, out, batch["labels"][start:stop], batch["has_text"][start:stop],
                           gather=all_gather_with_grad, gather_plain=all_gather_no_grad)
            loss.backward()
            results[name] = (float(loss.detach()), {k: p.grad.clone() for k, p in model.module.named_parameters()
                                           if p.grad is not None})
        torch.save(results, str(Path(out_dir) / f"rank{rank}.pt"))
        # Every rank is past its last collective before any rank tears the group down, and the
        # DDP reducer (which holds the group) is gone first: tearing down while the peer is still
        # in a collective, or letting interpreter exit destroy gloo's threads, aborted one rank
        # ("terminate called without an active exception") on a loaded CI machine.
        dist.barrier()
        del model
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown (static destructors of torch's C++ threads); the results are on
    # disk and the parent checks them.
    os._exit(0)


def test_gathered_loss_and_gradients_match_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = single_process_reference()
    for rank in range(2):
        got = torch.load(str(tmp_path / f"rank{rank}.pt"), weights_only=True)
        for name in LOSS_NAMES:
            loss, grads = got[name]
            ref_loss, ref_grads = expected[name]
            assert loss == pytest.approx(ref_loss, rel=1e-6), (name, rank)
            assert set(grads) == set(ref_grads), name
            for key in ref_grads:
                torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-5, atol=1e-6, msg=f"{name} {key}")


def test_gather_is_identity_without_a_process_group():
    t = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(t) is t
    assert all_gather_no_grad(t) is t


def test_lightning_ddp_matches_one_process(tmp_path):
    from safetensors.torch import load_file
    from test_dapt import config, make_pairs

    from zeroshot_ild_train import dapt

    folder = tmp_path / "montages"
    folder.mkdir()
    pairs = make_pairs(folder, count=21)
    # A fixed split: 16 train (4 global batches of 4), 5 val (the last val batch has one item,
    # fewer than ranks, so one rank pads).
    pairs = [dataclasses.replace(p, split="val" if i >= 16 else "train") for i, p in enumerate(pairs)]
    common = dict(loss="dlilp", max_steps=2, val_every_steps=2, learning_rate=1e-4)
    one = dapt.fit(config(tmp_path / "one", batch_size=4, **common), pairs)
    two = dapt.fit(config(tmp_path / "two", batch_size=2, devices=2, strategy="ddp_spawn", **common), pairs)
    assert two.global_step == one.global_step == 2
    assert two.best_val_loss == pytest.approx(one.best_val_loss, rel=1e-5)
    a, b = load_file(one.last_checkpoint), load_file(two.last_checkpoint)
    for key in a:
        # Two Adam steps at lr 1e-4: summation order differs, so allow a small fraction of one step.
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=2e-5, msg=key)
