"""The data of a DAPT run: the train/validation split, the checks before any model is built, and the loaders."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from ZeroShotILDLib.errors import InputError

from .dapt_config import DaptConfig, default_workers
from .data import GlobalBatchSampler, MontagePairDataset, PairRecord
from .lightning_required import L


class DaptDataModule(L.LightningDataModule):
    """Train/validation loaders over :class:`MontagePairDataset` with :class:`GlobalBatchSampler`.

    Lightning's own distributed sampler is switched off (``use_distributed_sampler=False``): the
    sampler here splits each global batch across ranks itself and, when a run resumes in the
    middle of an epoch, skips the batches already trained on.
    """

    def __init__(self, train: Sequence[PairRecord], val: Sequence[PairRecord], config: DaptConfig, image_size: int):
        super().__init__()
        self.config = config
        common = dict(image_size=int(image_size), views=config.views, text_choice=config.text_choice,
                      sentences_per_sample=config.sentences_per_sample, num_classes=len(config.class_names),
                      seed=config.seed, intensity_augment=config.intensity_augment)
        # Built here, not in setup(): a report without the chosen section fails before training.
        self.train_set = MontagePairDataset(train, **common)
        # Deterministic validation: no augmentation, the whole text of each report.
        self.val_set = MontagePairDataset(val, evaluation=True, **common)
        self._train_sampler: Optional[GlobalBatchSampler] = None

    def _rank_world(self) -> tuple:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _progress(self) -> tuple:
        """(epoch, batches of it already trained); the second is non-zero only when resuming mid-epoch.

        Every epoch has the same number of optimizer steps (full global batches only, no gradient
        accumulation), so both follow from the restored global step.
        """
        trainer = self.trainer
        if trainer is None or self._train_sampler is None:
            return 0, 0
        epoch = trainer.current_epoch
        per_epoch = len(self._train_sampler)
        done = trainer.global_step - epoch * per_epoch
        return epoch, min(max(done, 0), per_epoch)

    def _loader(self, dataset, sampler):
        from torch.utils.data import DataLoader

        workers = int(self.config.num_workers) if self.config.num_workers is not None else default_workers()
        return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self):
        rank, world = self._rank_world()
        self._train_sampler = GlobalBatchSampler(len(self.train_set), batch_size=self.config.batch_size, world_size=world,
                                                 rank=rank, shuffle=True, drop_last=True, seed=self.config.seed,
                                                 epoch_key=True, progress=self._progress)
        return self._loader(self.train_set, self._train_sampler)

    def val_dataloader(self):
        rank, world = self._rank_world()
        sampler = GlobalBatchSampler(len(self.val_set), batch_size=self.config.batch_size, world_size=world, rank=rank,
                                     shuffle=False, drop_last=False, seed=self.config.seed, epoch_key=False)
        return self._loader(self.val_set, sampler)


def _world_size(config: DaptConfig) -> int:
    devices = config.devices
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif isinstance(devices, str) and devices not in ("auto", "-1"):
        count = len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    elif isinstance(devices, int) and devices > 0:
        count = devices
    else:
        on_gpu = config.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        count = torch.cuda.device_count() if on_gpu else 1
    return max(1, count) * int(config.num_nodes)


def split_records(records: Sequence[PairRecord], *, val_fraction: float, seed: int) -> tuple:
    """(train, val) records: a split given in the records is kept, the rest is split by patient.

    Test-split records are never trained or validated on.
    """
    from .manifest import split_by_patient

    records = list(records)
    if any(r.split is None for r in records):
        records = split_by_patient(records, val_fraction=val_fraction, seed=seed)
    train = [r for r in records if r.split == "train"]
    val = [r for r in records if r.split == "val"]
    return train, val


def _check_records(train: list, val: list, config: DaptConfig, world: int) -> None:
    """One-line errors for data that cannot train, before any model is built."""
    if len(train) < config.batch_size * world:
        raise InputError(f"{len(train)} training pairs are fewer than one global batch of {config.batch_size * world}: "
                         f"lower --batch-size or add data")
    if not val:
        raise InputError("no validation pairs: raise --val-fraction or mark some patients as split val in the manifest")
    missing = [r for r in train + val if not Path(r.image_path).is_file()]
    if missing:
        raise InputError(f"{len(missing)} cached montages are missing (first: {missing[0].image_path}): run the preprocessing first")
    if config.loss != "dlilp":
        # Validation pairs without text but with a label only feed the zero-shot AUROC.
        val_ids = {id(r) for r in val}
        no_text = [r for r in train + val if not (r.report or "").strip() and not (id(r) in val_ids and r.target is not None)]
        if no_text:
            where = no_text[0].source or no_text[0].scan_id or no_text[0].image_path
            raise InputError(f"{len(no_text)} pairs have no report (first: {where}): loss {config.loss} needs text for every "
                             f"pair (validation images without text are kept only when they have a {config.val_label} label)")
        if not any((r.report or "").strip() for r in val):
            raise InputError(f"no validation pair has a report: loss {config.loss} needs text to be validated")
    if config.loss in ("unicl", "dlilp"):
        unlabelled = [r for r in train if not r.labels]
        if len(unlabelled) == len(train):
            raise InputError(f"loss {config.loss} needs labels but no training pair has any: add label columns to the manifest")
