"""Training pairs for DAPT: cached montage images, report text and labels, with paper 001's augmentations.

The montages themselves come from the engine (``ZeroShotILDLib.montage``) through the
preprocessing command, which caches one grayscale uint8 PNG (S x S) per scan. This module only
reads those PNGs; it never builds montages.

Randomness is a pure function of ``(seed, epoch, item index)``: the sentences sampled from a
report and the augmentation parameters of each view are drawn from a generator seeded with that
triple, never from global state. A run therefore sees the same pairs whatever the number of
data-loader workers or GPUs, and a run resumed from a checkpoint continues exactly as an
uninterrupted one would. :class:`GlobalBatchSampler` does the same for the order of samples: the
global batch ``b`` of epoch ``e`` is fixed, and each rank takes its share of it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from ZeroShotILDLib.errors import InputError

from . import reports

#: Key used in place of an epoch for validation items: augmentations and sentences then depend on
#: the item only, so every validation round scores the same pairs.
EVAL_EPOCH = -1
_TRAIN_STREAM, _EVAL_STREAM = 1, 2


@dataclass(frozen=True)
class PairRecord:
    """One training pair: a cached montage and the report (and labels) of the same scan.

    The fields ``scan_id``, ``patient_id``, ``split`` and ``source`` mirror
    ``manifest.ManifestRecord``, so ``manifest.split_by_patient`` splits these records too.

    Attributes
    ----------
    image_path : str
        Grayscale uint8 PNG montage at (or resized to) the model's input size.
    report : str
        The report or caption; the part used for training is chosen by ``text_choice`` when the
        dataset is built. Empty when the sample has labels only (DLILP's image-label data).
    labels : tuple of float
        Multi-hot labels in the order of the run's ``class_names``; empty when unlabelled.
    scan_id : str
        Unique name of the scan (default: the image path).
    patient_id : str or None
        Splits are made by patient, never by scan; None counts the scan as its own patient.
    split : str or None
        ``"train"``, ``"val"`` or ``"test"`` when fixed, else None.
    source : str
        Where the record came from (manifest line), for messages.
    ild : int or None
        1 (ILD, or any subtype), 0 (no ILD) or None (unlabelled).
    target : int or None
        The run's validation label (default: ``ild``), scored by the zero-shot validation AUROC.
    """

    image_path: str
    report: str = ""
    labels: tuple = ()
    scan_id: str = ""
    patient_id: Optional[str] = None
    split: Optional[str] = None
    source: str = ""
    #: The manifest's ILD label (1, 0) when it has one.
    ild: Optional[int] = None
    #: The run's validation label (1, 0; ``DaptConfig.val_label``, ``ild`` by default): validation
    #: scores zero-shot AUROC on it. Left out, it is ``ild``.
    target: Optional[int] = None

    def __post_init__(self):
        if self.target is None and self.ild is not None:
            object.__setattr__(self, "target", int(self.ild))  # frozen: set once, at construction

    @property
    def patient_key(self) -> str:
        return self.patient_id if self.patient_id else f"scan:{self.scan_id or self.image_path}"


def default_class_names(records: Sequence) -> tuple:
    """Label classes of manifest records: ``ild`` and ``no ild``, each subtype, each ``label_<name>``.

    ``records`` are ``manifest.ManifestRecord``; only classes that occur are listed.
    """
    names: list = []
    if any(r.ild is not None or r.subtype for r in records):
        names += ["ild", "no ild"]
    names += sorted({r.subtype.strip().lower() for r in records if r.subtype})
    names += sorted({k for r in records for k in r.labels} - set(names))
    return tuple(names)


def pairs_from_manifest(records: Sequence, montage_paths, class_names: Optional[Sequence[str]] = None,
                        label: str = "ild") -> list:
    """Training pairs from manifest records and their cached montages.

    Parameters
    ----------
    records : sequence of manifest.ManifestRecord
    montage_paths : mapping or callable
        scan_id -> path of the scan's cached montage PNG (as the preprocessing wrote it).
    class_names : sequence of str, optional
        Order of the label vector; default :func:`default_class_names`. ``ild`` is 1 for
        ILD (or any subtype), ``no ild`` is 1 for ``ild = 0``, a subtype class is 1 for that
        subtype, other names read ``label_<name>``; unknown labels count as 0.
    label : str
        The yes/no label each pair carries as ``target`` for the validation AUROC: ``ild`` (ILD
        or any subtype) or a ``label_<name>`` column (``covid`` or ``label_covid``).

    Returns
    -------
    list of PairRecord
        In input order, with the manifest's split and patient id.
    """
    classes = tuple(class_names) if class_names is not None else default_class_names(records)
    key = label.strip().lower()
    key = key[len("label_"):] if key.startswith("label_") else key
    lookup = montage_paths if callable(montage_paths) else montage_paths.__getitem__
    out = []
    for r in records:
        subtype = (r.subtype or "").strip().lower()
        ild = 1 if (r.ild == 1 or subtype) else 0
        values = []
        for name in classes:
            if name == "ild":
                values.append(float(ild))
            elif name == "no ild":
                values.append(float(r.ild == 0))
            elif subtype and name == subtype:
                values.append(1.0)
            else:
                values.append(float(r.labels.get(name) or 0))
        try:
            image = lookup(r.scan_id)
        except KeyError:
            raise InputError(f"{r.source}: no cached montage for this scan: run the preprocessing first") from None
        ild_value = 1 if (r.ild == 1 or subtype) else (0 if r.ild == 0 else None)
        if key == "ild":
            target = ild_value
        else:
            value = r.labels.get(key)
            target = None if value is None else int(bool(float(value)))
        out.append(PairRecord(image_path=str(image), report=r.read_report() or "", labels=tuple(values),
                              scan_id=r.scan_id, patient_id=r.patient_id, split=r.split, source=r.source,
                              ild=ild_value, target=target))
    return out


@dataclass(frozen=True)
class AugmentationSettings:
    """Random geometric and intensity changes of one view (paper 001, appendix 1.1).

    Attributes
    ----------
    rotation_deg : (float, float)
        Range of the in-plane rotation, degrees.
    crop_area : (float, float)
        Range of the crop's area as a fraction of the image (random resized crop).
    crop_aspect : (float, float)
        Range of the crop's width/height ratio (sampled log-uniformly).
    flip_probability : float
        Probability of a left-right flip.
    brightness : (float, float)
        Range of the brightness factor (1 = unchanged, the default).
    contrast : (float, float)
        Range of the contrast factor around the image mean (1 = unchanged, the default).

    Brightness and contrast are off by default: a montage's grey levels are HU through a fixed
    window, so scaling them changes the density that tells ground glass and fibrosis apart.
    """

    rotation_deg: tuple = (-20.0, 20.0)
    crop_area: tuple = (0.8, 1.0)
    crop_aspect: tuple = (0.9, 1.1)
    flip_probability: float = 0.5
    brightness: tuple = (1.0, 1.0)
    contrast: tuple = (1.0, 1.0)


#: Paper 001's weak augmentation (WA), geometric part: rotation +-20 deg, crop area 0.8-1, aspect 0.9-1.1.
WEAK = AugmentationSettings()
#: Paper 001's strong augmentation (SA), geometric part: rotation +-30 deg, crop area 0.7-1, aspect 0.8-1.2.
STRONG = AugmentationSettings(rotation_deg=(-30.0, 30.0), crop_area=(0.7, 1.0), crop_aspect=(0.8, 1.2))
#: Brightness/contrast factors 0.5-2 (opt-in, ``intensity_augment``): they change HU-window density.
INTENSITY_RANGE = (0.5, 2.0)

#: View name -> augmentation (None = the image as cached).
VIEW_AUGMENTATIONS = {"original": None, "weak": WEAK, "strong1": STRONG, "strong2": STRONG}


def view_augmentation(view: str, *, intensity: bool = False) -> Optional[AugmentationSettings]:
    """The augmentation of a view; ``intensity`` adds brightness/contrast 0.5-2 to the geometric one."""
    settings = VIEW_AUGMENTATIONS[view]
    if settings is None or not intensity:
        return settings
    return replace(settings, brightness=INTENSITY_RANGE, contrast=INTENSITY_RANGE)


def augment(image: torch.Tensor, settings: AugmentationSettings, rng: np.random.Generator) -> torch.Tensor:
    """One random augmentation of a (1, S, S) float image in [0, 1]; returns a new (1, S, S) image.

    Order: random resized crop (back to S x S), rotation about the centre (corners filled with
    0, the black of the montage background), flip, brightness, contrast; clipped to [0, 1].
    All parameters come from ``rng``, so the result is reproducible from its seed.
    """
    import torchvision.transforms.v2.functional as TF

    _, height, width = image.shape
    area = height * width * rng.uniform(*settings.crop_area)
    aspect = math.exp(rng.uniform(math.log(settings.crop_aspect[0]), math.log(settings.crop_aspect[1])))
    crop_w = int(round(min(width, math.sqrt(area * aspect))))
    crop_h = int(round(min(height, math.sqrt(area / aspect))))
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    out = TF.resized_crop(image, top, left, crop_h, crop_w, [height, width], antialias=True)
    angle = float(rng.uniform(*settings.rotation_deg))
    out = TF.rotate(out, angle, interpolation=TF.InterpolationMode.BILINEAR, fill=0.0)
    if rng.random() < settings.flip_probability:
        out = TF.horizontal_flip(out)
    if tuple(settings.brightness) != (1.0, 1.0):
        out = TF.adjust_brightness(out, float(rng.uniform(*settings.brightness)))
    if tuple(settings.contrast) != (1.0, 1.0):
        out = TF.adjust_contrast(out, float(rng.uniform(*settings.contrast)))
    return out.clamp_(0.0, 1.0)


def load_montage(path: str, image_size: int) -> torch.Tensor:
    """A cached montage PNG as a (1, image_size, image_size) float tensor in [0, 1].

    Montages cached at another size are resized (bicubic, antialiased), so a cache made for one
    model can train another.
    """
    from PIL import Image

    try:
        with Image.open(path) as handle:
            array = np.asarray(handle.convert("L"), dtype=np.float32) / 255.0
    except (OSError, ValueError) as exc:
        raise InputError(f"montage {path} cannot be read ({exc.__class__.__name__}): re-run the preprocessing for it") from None
    pixels = torch.from_numpy(array)[None]
    if pixels.shape[-2:] != (image_size, image_size):
        pixels = F.interpolate(pixels[None], size=(image_size, image_size), mode="bicubic",
                               align_corners=False, antialias=True)[0].clamp_(0.0, 1.0)
    return pixels


def report_sentences(report: str, text_choice: str, *, source: str = "") -> list[str]:
    """Sentences of the chosen part of a report (``reports.TEXT_CHOICES``); [] when the report is empty."""
    if not (report or "").strip():
        return []
    text = reports.select_text(report, text_choice, source=source)
    return reports.split_sentences(text)


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of item ``index`` in ``epoch`` (``EVAL_EPOCH`` for validation)."""
    stream = _EVAL_STREAM if epoch == EVAL_EPOCH else _TRAIN_STREAM
    return np.random.default_rng(np.random.SeedSequence([int(seed), stream, max(int(epoch), 0), int(index)]))


class MontagePairDataset(Dataset):
    """(montage views, text, labels) items for contrastive training.

    Parameters
    ----------
    records : sequence of PairRecord
    image_size : int
        The model's input size in pixels; montages are resized to it if needed.
    views : sequence of str
        Image views to return, from ``"original"``, ``"weak"``, ``"strong1"``, ``"strong2"``
        (e.g. ``("weak",)`` for CLIP, ``("weak", "strong1", "strong2")`` for SLIP,
        ``("original", "weak")`` for UniCLIP).
    text_choice : str
        Which part of each report is used (``reports.TEXT_CHOICES``), default
        ``"findings+impression"`` (paper 001).
    sentences_per_sample : int
        n sentences sampled per item and epoch (paper 001: 3); 0 keeps the whole chosen text.
    num_classes : int
        Length of the label vectors; records with fewer labels are padded with 0.
    seed : int
        Seed of all per-item randomness.
    evaluation : bool
        Validation items: every view is the montage as cached and the text is the whole chosen
        part of the report, so the validation loss measures the model, not the sampling.
    intensity_augment : bool
        Add brightness/contrast 0.5-2 to the augmented views (off: geometric only).

    Items are requested as ``(index, epoch)`` (what :class:`GlobalBatchSampler` yields), as
    ``(index, epoch, False)`` for a padding item, or as a plain index, which means ``EVAL_EPOCH``.
    Each item is a dict with ``views`` (name -> (1, S, S) float tensor), ``text`` (str, "" when
    the record has no report), ``has_text`` (bool), ``labels`` ((num_classes,) float tensor),
    ``valid`` (bool, False for padding), ``index`` and ``target`` (the validation label: 1, 0, or -1
    when unknown).
    """

    def __init__(self, records: Sequence[PairRecord], *, image_size: int, views: Sequence[str] = ("weak",),
                 text_choice: str = "findings+impression", sentences_per_sample: int = reports.DEFAULT_SENTENCES_PER_SAMPLE,
                 num_classes: int = 0, seed: int = 0, evaluation: bool = False, intensity_augment: bool = False):
        unknown = [v for v in views if v not in VIEW_AUGMENTATIONS]
        if unknown:
            raise ValueError(f"unknown views {unknown}; use {sorted(VIEW_AUGMENTATIONS)}")
        self.records = list(records)
        self.image_size = int(image_size)
        self.views = tuple(views)
        self.sentences_per_sample = int(sentences_per_sample)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.evaluation = bool(evaluation)
        self.intensity_augment = bool(intensity_augment)
        # Parsed once: sampling then costs nothing per step.
        self.sentences = [report_sentences(r.report, text_choice, source=r.source or r.scan_id or Path(r.image_path).name)
                          for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key) -> dict:
        if isinstance(key, tuple):
            index, epoch, valid = (tuple(key) + (True,))[:3]
        else:
            index, epoch, valid = int(key), EVAL_EPOCH, True
        record = self.records[index]
        rng = item_rng(self.seed, epoch, index)
        text_rng, *view_rngs = rng.spawn(1 + len(self.views))
        sentences = self.sentences[index]
        if not sentences:
            text = ""
        elif self.sentences_per_sample > 0 and not self.evaluation:
            text = reports.sample_text(sentences, self.sentences_per_sample, rng=text_rng)
        else:
            text = " ".join(sentences)
        image = load_montage(record.image_path, self.image_size)
        views = {}
        for name, view_rng in zip(self.views, view_rngs):
            settings = None if self.evaluation else view_augmentation(name, intensity=self.intensity_augment)
            views[name] = image.clone() if settings is None else augment(image, settings, view_rng)
        labels = torch.zeros(self.num_classes, dtype=torch.float32)
        if self.num_classes and record.labels:
            values = torch.as_tensor([float(v) for v in record.labels[: self.num_classes]], dtype=torch.float32)
            labels[: values.numel()] = values
        return {"views": views, "text": text, "has_text": bool(text), "labels": labels, "valid": bool(valid),
                "index": index, "target": -1 if record.target is None else int(record.target)}


class GlobalBatchSampler(Sampler):
    """Batches of ``(index, epoch)`` keys: this rank's share of fixed global batches.

    Epoch ``e`` orders the items by a permutation seeded with ``(seed, e)`` (or keeps their order
    when ``shuffle`` is False); global batch ``b`` is items ``[b*G, (b+1)*G)`` of that order with
    ``G = batch_size * world_size``, and rank ``r`` takes the r-th of ``world_size`` near-equal
    parts of it. The global batches, and with them the loss over the gathered features, are
    therefore the same for any number of processes with the same global batch size.

    Parameters
    ----------
    num_items : int
    batch_size : int
        Items per rank and batch.
    world_size, rank : int
        Number of processes and this one's index.
    shuffle : bool
        New random order each epoch (training) or the items' own order (validation).
    drop_last : bool
        Drop the final incomplete global batch (training: every step sees a full batch). When it
        is kept and has fewer items than there are ranks, the ranks left without an item get a
        padding key ``(index, epoch, False)`` whose item has ``valid`` False.
    seed : int
    epoch_key : bool
        Yield the epoch with each index (training: fresh augmentations per epoch) or
        ``EVAL_EPOCH`` (validation: the same pairs every round).
    progress : callable, optional
        Called at the start of each pass; returns ``(epoch, batches already done in it)``, so
        that a run resumed from a checkpoint in the middle of an epoch continues with the next
        batch of the same order. Without it the epoch is the one given to :meth:`set_epoch`
        and every pass starts at the first batch.
    """

    def __init__(self, num_items: int, *, batch_size: int, world_size: int = 1, rank: int = 0, shuffle: bool = True,
                 drop_last: bool = True, seed: int = 0, epoch_key: bool = True,
                 progress: Optional[Callable[[], tuple]] = None):
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        self.num_items = int(num_items)
        self.batch_size = int(batch_size)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = int(seed)
        self.epoch_key = epoch_key
        self.progress = progress
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        full, rest = divmod(self.num_items, self.global_batch_size)
        return full + int(not self.drop_last and rest > 0)

    def __iter__(self) -> Iterator[list]:
        epoch, start = (self.epoch, 0) if self.progress is None else self.progress()
        epoch, start = int(epoch), max(0, int(start))
        if self.shuffle:
            order = np.random.default_rng(np.random.SeedSequence([self.seed, 0, epoch])).permutation(self.num_items)
        else:
            order = np.arange(self.num_items)
        tag = epoch if self.epoch_key else EVAL_EPOCH
        size = self.global_batch_size
        for b in range(start, len(self)):
            members = np.array_split(order[b * size:(b + 1) * size], self.world_size)[self.rank]
            if len(members) == 0:
                # A final validation batch smaller than the number of ranks: this rank takes part
                # in the collectives with one padding item that the loss leaves out.
                yield [(int(order[b * size]), tag, False)]
            else:
                yield [(int(i), tag) for i in members]
