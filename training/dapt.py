"""Domain-adaptive pre-training (DAPT): contrastive fine-tuning of a registry model on (montage, text) pairs.

Lightning supplies the loop, checkpointing, early stopping, precision, devices and nodes; this
module says only what is specific to the method: which loss, which views, which text.

Paper 000's recipe is the default: 10 % of patients held out for validation, validation and a
checkpoint every 100 steps, early stopping after 1,000 steps without improvement, the five best
checkpoints by validation loss kept (for ensembles), at most 10 epochs, and a sweep over five
learning rates in [1e-5, 1e-3] picking the best by validation loss. Paper 001 supplies sentence
sampling (n = 3), the relaxed positive-pair similarity, SLIP and UniCLIP; paper 002 UniCL and
DLILP.

Output folder of :func:`fit`::

    checkpoints/step0000100-val_loss1.2345.safetensors   top-k engine checkpoints (dapt:<path>)
    checkpoints/last.safetensors                         the latest weights, engine format
    checkpoints/last.ckpt                                Lightning state for ``resume=True``
    best.safetensors                                     copy of the best top-k checkpoint
    ensemble.json                                        top-k paths, best first, for averaging
    dapt_summary.json                                    settings, split sizes, losses, steps
    logs/version_*/metrics.csv                           loss curves

Every ``.safetensors`` file is written by ``ZeroShotILDLib.models.save_checkpoint`` (architecture,
preprocessing and these training settings in its metadata, no pickled objects), so the engine
loads it with ``load_model("dapt:<path>")``. A DLILP run writes the image-label head and class
prototypes beside each checkpoint as ``<name>.labelhead.safetensors`` (:func:`load_label_head`).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ZeroShotILDLib import models
from ZeroShotILDLib.errors import InputError

try:
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
except ImportError:  # pragma: no cover - depends on the installation
    raise InputError("training needs the optional dependencies: pip install 'zeroshot-ild[train]'") from None

from . import losses
from .data import GlobalBatchSampler, MontagePairDataset, PairRecord
from .distributed import all_gather_no_grad, all_gather_with_grad
from .files import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

LOSSES = ("clip", "relaxed", "slip", "uniclip", "unicl", "dlilp")
OPTIMIZERS = ("adamw", "adam")
#: Image views each loss needs (``augment=False`` turns "weak" into "original" where it is optional).
LOSS_VIEWS = {
    "clip": ("weak",), "relaxed": ("weak",), "unicl": ("weak",), "dlilp": ("weak",),
    "slip": ("weak", "strong1", "strong2"), "uniclip": ("original", "weak"),
}
LOGIT_SCALE_MAX = math.log(100.0)
LABEL_HEAD_SUFFIX = ".labelhead.safetensors"
_LABEL_HEAD_KEY = "zeroshot_ild_label_head"


# ----------------------------------------------------------------------------------------------
# Settings and results
# ----------------------------------------------------------------------------------------------
@dataclass
class DaptConfig:
    """Settings of one DAPT run. Defaults follow paper 000's recipe (and paper 001's loss settings).

    Model and output
        output_dir : folder for checkpoints, logs and the summary.
        model, checkpoint, weights_dir : the base model, as for ``models.load_model``.
    Loss
        loss : ``clip`` | ``relaxed`` (CLIP with paper 001's eq. 3) | ``slip`` | ``uniclip`` |
            ``unicl`` | ``dlilp`` (the last two need labels and ``class_names``).
        relaxed_positives : also apply eq. 3 to the positives of ``slip``/``uniclip`` (paper 001's
            "w/ ours"); ``relaxed`` implies it for CLIP.
        relax_threshold, relax_slope : t (0.5) and alpha (10) of eq. 3.
        ssl_weight, ssl_temperature : weight (1) and fixed temperature (0.1) of SLIP's NT-Xent.
        dlilp_text_weight : lambda of DLILP's image-text term (0.1).
        class_names : label classes in the order of ``PairRecord.labels``.
    Text and images
        text_choice : report part, see ``reports.TEXT_CHOICES`` (``findings+impression``).
        sentences_per_sample : n sentences sampled per step (3); 0 = the whole text.
        augment : weak augmentation of the CLIP/UniCL/DLILP image (paper 001 trains CLIP on WA).
    Optimisation
        batch_size : samples per device and step; the loss sees batch_size x devices x nodes.
        learning_rate : peak learning rate after warm-up (1e-4).
        optimizer : ``adamw`` or ``adam``; weight_decay (0.1) applies to matrices only.
        warmup_steps : linear warm-up (100 optimizer steps), then cosine decay to 0 at the end.
        max_epochs (10), max_steps (-1 = no limit): whichever ends training first.
        gradient_clip_norm : max global L2 norm of the gradients (1.0; None = off).
        logit_scale_max : clamp of log(1/tau) after every step (ln 100).
    Validation and checkpoints
        val_fraction : share of patients held out when the records carry no split (0.1).
        val_every_steps : validation and checkpoint interval, optimizer steps (100).
        patience_steps : stop after this many steps without a better validation loss (1000).
        top_k : checkpoints kept by validation loss (5).
    Hardware
        accelerator (``auto``/``cpu``/``gpu``), devices (per node), num_nodes, strategy
        (``auto`` = DDP when more than one process), precision (``auto`` = bf16-mixed on GPUs
        that support it, else 16-mixed; 32-true on CPU), num_workers (data loader processes).
    Reproducibility
        seed : seeds the model head initialisation, the sample order, sentence sampling and
        augmentations; deterministic : ask torch for deterministic kernels (slower on GPU).
        progress_bar : Lightning's tqdm bar.
    Provenance
        montage_settings : the engine ``AnalysisSettings.to_dict()`` the cached montages were
            built with (retrieval, montage size, filter threshold, HU window, patch size, seed);
            stored in every exported checkpoint so that test-time montages can match them.
    """

    output_dir: str
    model: str = "chexzero"
    checkpoint: Optional[str] = None
    weights_dir: Optional[str] = None
    loss: str = "clip"
    relaxed_positives: bool = False
    relax_threshold: float = losses.RELAX_THRESHOLD
    relax_slope: float = losses.RELAX_SLOPE
    ssl_weight: float = 1.0
    ssl_temperature: float = 0.1
    dlilp_text_weight: float = 0.1
    class_names: tuple = ()
    text_choice: str = "findings+impression"
    sentences_per_sample: int = 3
    augment: bool = True
    batch_size: int = 64
    learning_rate: float = 1e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.1
    warmup_steps: int = 100
    max_epochs: int = 10
    max_steps: int = -1
    gradient_clip_norm: Optional[float] = 1.0
    logit_scale_max: float = LOGIT_SCALE_MAX
    val_fraction: float = 0.1
    val_every_steps: int = 100
    patience_steps: int = 1000
    top_k: int = 5
    accelerator: str = "auto"
    devices: Union[int, str] = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"
    num_workers: int = 4
    seed: int = 0
    deterministic: bool = False
    progress_bar: bool = True
    montage_settings: Optional[dict] = None

    def validate(self) -> None:
        """Raise ``InputError`` (one line) for settings that cannot work."""
        if self.loss not in LOSSES:
            raise InputError(f"unknown loss {self.loss!r}: use one of {', '.join(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"unknown optimizer {self.optimizer!r}: use adamw or adam")
        if self.loss in ("unicl", "dlilp") and not self.class_names:
            raise InputError(f"loss {self.loss} needs labels: give class names (label columns in the manifest)")
        for name in ("batch_size", "val_every_steps", "top_k", "max_epochs", "num_nodes"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise InputError(f"learning rate must be positive, got {self.learning_rate}")
        if not 0.0 < self.relax_threshold < 1.0:
            raise InputError(f"relax threshold must lie in (0, 1), got {self.relax_threshold}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise InputError(f"val fraction must lie in [0, 1), got {self.val_fraction}")
        if self.sentences_per_sample < 0:
            raise InputError(f"sentences per sample must be 0 (whole text) or more, got {self.sentences_per_sample}")

    def to_json(self) -> dict:
        """The settings as plain JSON values (stored in every exported checkpoint)."""
        out = dataclasses.asdict(self)
        out["class_names"] = list(self.class_names)
        return out

    @property
    def views(self) -> tuple:
        views = LOSS_VIEWS[self.loss]
        if not self.augment and self.loss in ("clip", "relaxed", "unicl", "dlilp"):
            views = ("original",)
        return views


@dataclass
class FitResult:
    """What :func:`fit` produced. Paths are absolute; losses are validation losses (lower = better)."""

    output_dir: str
    best_checkpoint: Optional[str]
    best_val_loss: Optional[float]
    #: Top-k engine checkpoints, best first: ``{"path", "val_loss", "step"}``.
    top_k: list = field(default_factory=list)
    ensemble_json: Optional[str] = None
    last_checkpoint: Optional[str] = None
    resume_checkpoint: Optional[str] = None
    global_step: int = 0
    stopped_early: bool = False
    train_samples: int = 0
    val_samples: int = 0
    summary_json: Optional[str] = None


@dataclass
class SweepResult:
    """Outcome of :func:`sweep`: one FitResult per learning rate and the best of them."""

    best_learning_rate: Optional[float]
    best: Optional[FitResult]
    runs: dict
    summary_json: str
    summary_csv: str


# ----------------------------------------------------------------------------------------------
# The DLILP image-label head
# ----------------------------------------------------------------------------------------------
class LabelHead(torch.nn.Module):
    """DLILP's image-label head: a bias-free linear map of the CLIP image embedding, class prototypes
    and their own temperature.

    Because the map has no bias, it commutes with L2 normalisation of its input up to a positive
    factor, so it applies equally to raw and to L2-normalised image features (what the engine keeps).
    """

    def __init__(self, embed_dim: int, class_names: Sequence[str], prototypes: Optional[torch.Tensor] = None,
                 logit_scale: float = math.log(1 / 0.07)):
        super().__init__()
        self.class_names = tuple(class_names)
        self.projection = torch.nn.Linear(embed_dim, embed_dim, bias=False)
        with torch.no_grad():
            # Starts as the CLIP image space itself, where text-initialised prototypes make sense.
            self.projection.weight.copy_(torch.eye(embed_dim))
        init = prototypes if prototypes is not None else torch.randn(len(self.class_names), embed_dim)
        self.prototypes = torch.nn.Parameter(init.detach().clone().float())
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(logit_scale)))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """(N, D) image embeddings -> (N, D) L2-normalised image-label embeddings."""
        return F.normalize(self.projection(image_features), dim=-1)

    def class_logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """(N, C) scaled cosine similarities to the class prototypes."""
        prototypes = F.normalize(self.prototypes, dim=-1)
        return self.logit_scale.exp() * (self(image_features) @ prototypes.t())

    def class_probabilities(self, image_features: torch.Tensor) -> torch.Tensor:
        """Zero-shot probabilities of the known classes: softmax over the prototypes, (N, C)."""
        return self.class_logits(image_features).softmax(dim=-1)


def save_label_head(path: Union[str, Path], head: LabelHead) -> Path:
    """Write a LabelHead as safetensors, class names in the metadata (written atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in head.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_LABEL_HEAD_KEY: json.dumps({"class_names": list(head.class_names)})})
    return path


def load_label_head(path: Union[str, Path], device: str = "cpu") -> LabelHead:
    """The DLILP label head saved beside a checkpoint (``<checkpoint>`` or ``<name>.labelhead.safetensors``)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.name.endswith(LABEL_HEAD_SUFFIX):
        path = label_head_path(path)
    if not path.is_file():
        raise InputError(f"{path.name} does not exist: only DLILP runs write a label head")
    with safe_open(str(path), framework="pt", device=device) as handle:
        meta = json.loads((handle.metadata() or {}).get(_LABEL_HEAD_KEY, "{}"))
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    names = meta.get("class_names") or []
    head = LabelHead(tensors["prototypes"].shape[1], names)
    head.load_state_dict(tensors)
    return head.eval()


def label_head_path(checkpoint: Union[str, Path]) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name[: -len(checkpoint.suffix)] + LABEL_HEAD_SUFFIX
                                if checkpoint.suffix else checkpoint.name + LABEL_HEAD_SUFFIX)


# ----------------------------------------------------------------------------------------------
# Lightning module and data module
# ----------------------------------------------------------------------------------------------
class DaptModule(L.LightningModule):
    """A LoadedModel's CLIP trained with one of :data:`LOSSES` over the global batch.

    Parameters
    ----------
    loaded : models.LoadedModel
        The base model; its ``model`` is trained in place.
    config : DaptConfig
    """

    def __init__(self, loaded: "models.LoadedModel", config: DaptConfig):
        super().__init__()
        self.config = config
        self.spec = loaded.spec
        self.clip = loaded.model.train()
        self.tokenizer = loaded.tokenizer
        self.image_size = loaded.image_size
        # Kept for its input normalisation only (the engine's own, so training sees exactly
        # what analysis feeds the model); its ``model`` is ``self.clip``, registered above.
        self._engine_model = loaded
        #: Optimizer steps of the whole run (the cosine schedule's length); set by :func:`fit`.
        self.total_steps = max(1, int(config.max_steps)) if config.max_steps > 0 else 1
        self.label_head: Optional[LabelHead] = None
        if config.loss == "dlilp":
            with torch.no_grad():
                tokens = self.tokenizer(list(config.class_names)).to(next(self.clip.parameters()).device)
                prototypes = F.normalize(self.clip.encode_text(tokens).float(), dim=-1)
            self.label_head = LabelHead(prototypes.shape[1], config.class_names, prototypes,
                                        logit_scale=float(self.clip.logit_scale.detach()))

    # -- features --------------------------------------------------------------------------
    def normalize(self, pixels01: torch.Tensor) -> torch.Tensor:
        """(N, 1|3, S, S) in [0, 1] -> the model's input normalisation (``LoadedModel.normalize``)."""
        return self._engine_model.normalize(pixels01)

    def encode_images(self, pixels01: torch.Tensor) -> torch.Tensor:
        """Raw (un-normalised) float32 image embeddings, (N, D)."""
        return self.clip.encode_image(self.normalize(pixels01)).float()

    # -- loss ------------------------------------------------------------------------------
    def compute_loss(self, batch: dict) -> tuple:
        """Loss over the global batch (features gathered from every rank) and its global size."""
        names = list(self.config.views)
        views = batch["views"]
        local = views[names[0]].shape[0]
        # One encoder pass for all views: cheaper than several small ones on a GPU.
        raw = self.encode_images(torch.cat([views[n] for n in names], dim=0))
        tokens = self.tokenizer(list(batch["text"])).to(raw.device)
        raw_text = self.clip.encode_text(tokens).float()
        # Similarities, softmaxes and the gather in float32 even under mixed precision: bf16
        # logits would blur the small differences the contrastive losses are made of.
        with torch.autocast(device_type=raw.device.type, enabled=False):
            return self._loss_from_features(dict(zip(names, raw.split(local, dim=0))), raw_text, batch)

    def _loss_from_features(self, raw_views: dict, raw_text: torch.Tensor, batch: dict) -> tuple:
        cfg = self.config
        names = list(cfg.views)
        # Padding rows (a last validation batch smaller than the number of ranks) are dropped
        # after the gather, so the loss is the same for any number of processes.
        valid = all_gather_no_grad(batch["valid"].bool())

        def gather(features: torch.Tensor) -> torch.Tensor:
            return all_gather_with_grad(features)[valid]

        image = {n: gather(F.normalize(v, dim=-1)) for n, v in raw_views.items()}
        text = gather(F.normalize(raw_text, dim=-1))
        scale = self.clip.logit_scale.float().exp()
        relax = dict(threshold=cfg.relax_threshold, slope=cfg.relax_slope)
        first = image[names[0]]
        if cfg.loss in ("clip", "relaxed"):
            loss = losses.clip_loss(first, text, scale, relaxed=cfg.loss == "relaxed" or cfg.relaxed_positives, **relax)
        elif cfg.loss == "slip":
            loss = losses.slip_loss(image["weak"], text, image["strong1"], image["strong2"], scale,
                                    ssl_weight=cfg.ssl_weight, ssl_temperature=cfg.ssl_temperature,
                                    relaxed=cfg.relaxed_positives, **relax)
        elif cfg.loss == "uniclip":
            loss = losses.uniclip_loss(image["original"], image["weak"], text, scale, relaxed=cfg.relaxed_positives, **relax)
        elif cfg.loss == "unicl":
            labels = all_gather_no_grad(batch["labels"].float())[valid]
            loss = losses.unicl_loss(first, text, labels, scale)
        else:  # dlilp
            labels = all_gather_no_grad(batch["labels"].float())[valid]
            has_text = all_gather_no_grad(batch["has_text"].bool())[valid]
            label_features = gather(self.label_head(raw_views[names[0]]))
            loss = losses.dlilp_loss(label_features, self.label_head.prototypes, labels, first, text, has_text,
                                     self.label_head.logit_scale.exp(), scale, text_weight=cfg.dlilp_text_weight)
        return loss, first.shape[0]

    def training_step(self, batch, batch_idx):
        loss, size = self.compute_loss(batch)
        # Every rank holds the same global loss, so no cross-rank reduction is needed.
        self.log("train_loss", loss, batch_size=size, on_step=True, on_epoch=False, prog_bar=True)
        self.log("logit_scale", self.clip.logit_scale.detach().exp(), batch_size=size, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, size = self.compute_loss(batch)
        # Identical on every rank already; sync_dist only keeps Lightning's bookkeeping uniform.
        self.log("val_loss", loss, batch_size=size, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # CLIP's recipe: keep 1/tau <= 100 after every update.
        with torch.no_grad():
            self.clip.logit_scale.clamp_(0.0, self.config.logit_scale_max)
            if self.label_head is not None:
                self.label_head.logit_scale.clamp_(0.0, self.config.logit_scale_max)

    def configure_optimizers(self):
        cfg = self.config
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            # Gains, biases, temperatures and prototypes are not shrunk towards zero.
            (no_decay if param.ndim < 2 or "logit_scale" in name or "prototypes" in name else decay).append(param)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if cfg.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.98), eps=1e-6)
        else:
            optimizer = torch.optim.Adam(groups, lr=cfg.learning_rate, betas=(0.9, 0.98), eps=1e-6)
        # Not trainer.estimated_stepping_batches: that builds the train loader before a resumed
        # run's step counter is restored, and data-loader workers would then prefetch the
        # batches of the epoch's start instead of those after the checkpoint.
        total = int(self.total_steps)
        warmup = int(cfg.warmup_steps)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # -- export ----------------------------------------------------------------------------
    def export(self, path: Union[str, Path], **training_extra) -> Path:
        """Write the current CLIP weights as an engine checkpoint (plus the DLILP label head)."""
        training = self.config.to_json()
        training.update(training_extra)
        path = models.save_checkpoint(path, self.clip, self.spec, extra={"training": _jsonable(training)})
        if self.label_head is not None:
            save_label_head(label_head_path(path), self.label_head)
        return path


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


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
                      seed=config.seed)
        # Built here, not in setup(): a report without the chosen section fails before training.
        self.train_set = MontagePairDataset(train, **common)
        self.val_set = MontagePairDataset(val, **common)
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

        workers = int(self.config.num_workers)
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


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
RESUME_NAME = "last.ckpt"


class EngineCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose top-k files are engine checkpoints (safetensors via ``save_checkpoint``).

    The top-k files carry the weights only (what the engine and ensembles need); the full
    Lightning state for resuming (optimizer, scheduler, loops, callbacks) is written once, as
    ``last.ckpt``, whenever ``last.safetensors`` is. After every validation the current top-k
    list is written to ``ensemble_json`` (rank 0), so it is on disk whatever the strategy and
    even while training still runs.
    """

    FILE_EXTENSION = ".safetensors"

    def __init__(self, *args, ensemble_json: Union[str, Path], config: DaptConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.ensemble_json = Path(ensemble_json)
        self.config = config

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        path = Path(filepath)
        if path.stem.startswith(self.CHECKPOINT_NAME_LAST):
            trainer.save_checkpoint(str(path.with_name(RESUME_NAME)), weights_only=False)
        if trainer.is_global_zero:
            metrics = trainer.callback_metrics
            extra = {"global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch)}
            if "val_loss" in metrics:
                extra["val_loss"] = float(metrics["val_loss"])
            trainer.lightning_module.export(path, **extra)
        trainer.strategy.barrier()
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            label_head_path(filepath).unlink(missing_ok=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.is_global_zero and not trainer.sanity_checking:
            ranked = sorted(((float(v), str(Path(p).resolve())) for p, v in self.best_k_models.items()))
            top_k = [{"path": p, "val_loss": v, "step": _step_of(p)} for v, p in ranked]
            write_ensemble(self.ensemble_json, top_k, self.config, global_step=int(trainer.global_step))


class _ValidateAtEnd(L.Callback):
    """Ask for a validation (hence a checkpoint) after the final step, which the fixed interval may miss.

    Lightning validates in the middle of an epoch when ``should_stop`` is set, so setting it at
    the last planned step makes the final weights a scored, exported checkpoint too.
    """

    def __init__(self, total_steps: int):
        self.total_steps = int(total_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.total_steps:
            trainer.should_stop = True


# ----------------------------------------------------------------------------------------------
# fit / sweep / export
# ----------------------------------------------------------------------------------------------
def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto`` -> bf16-mixed (or 16-mixed) on CUDA GPUs, 32-true on CPU; refuses mixed precision on CPU."""
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if precision == "auto":
        if not on_gpu:
            return "32-true"
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if "mixed" in precision and not on_gpu:
        # bf16 autocast on CPU runs several times slower than float32 (see notes/models.md).
        raise InputError(f"precision {precision} needs a CUDA GPU: use --precision 32-true (or auto) on CPU")
    return precision


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
        no_text = [r for r in train + val if not (r.report or "").strip()]
        if no_text:
            where = no_text[0].source or no_text[0].scan_id or no_text[0].image_path
            raise InputError(f"{len(no_text)} pairs have no report (first: {where}): loss {config.loss} needs text for every pair")
    if config.loss in ("unicl", "dlilp"):
        unlabelled = [r for r in train if not r.labels]
        if len(unlabelled) == len(train):
            raise InputError(f"loss {config.loss} needs labels but no training pair has any: add label columns to the manifest")


def fit(config: DaptConfig, records: Sequence[PairRecord], *, resume: bool = False,
        train_records: Optional[Sequence[PairRecord]] = None, val_records: Optional[Sequence[PairRecord]] = None,
        callbacks: Sequence = ()) -> FitResult:
    """Run DAPT and return where its checkpoints are.

    Parameters
    ----------
    config : DaptConfig
    records : sequence of PairRecord
        All pairs; split into train/val by :func:`split_records` unless ``train_records`` and
        ``val_records`` are given (then ``records`` is ignored).
    resume : bool
        Continue from ``<output_dir>/checkpoints/last.ckpt`` when it exists; the run then ends
        where an uninterrupted one would (same sample order, sentences, augmentations and
        schedule). A fresh start otherwise.
    callbacks : sequence of lightning callbacks
        Added to the run (monitoring, tests).

    Returns
    -------
    FitResult
    """
    config.validate()
    output = Path(config.output_dir).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)
    checkpoints = output / "checkpoints"
    resume_path = checkpoints / RESUME_NAME
    if not resume and resume_path.exists():
        raise InputError(f"{output} already holds a run: pass --resume to continue it or choose another output folder")
    summary_path = output / "dapt_summary.json"
    if resume and summary_path.is_file():  # written only when a run has finished: nothing left to do
        return FitResult(**json.loads(summary_path.read_text(encoding="utf-8"))["result"])
    if resume and resume_path.exists():
        # Untrusted until read weights-only: refused in one line before any work (or log line) starts.
        read_lightning_checkpoint(resume_path)
    L.seed_everything(config.seed, workers=True, verbose=False)
    if train_records is None or val_records is None:
        train_records, val_records = split_records(records, val_fraction=config.val_fraction, seed=config.seed)
    train_records, val_records = list(train_records), list(val_records)
    world = _world_size(config)
    _check_records(train_records, val_records, config, world)

    precision = resolve_precision(config.precision, config.accelerator)
    loaded = models.load_model(config.model, checkpoint=config.checkpoint, weights_dir=config.weights_dir, device="cpu")
    steps_per_epoch = len(train_records) // (config.batch_size * world)
    total_steps = steps_per_epoch * config.max_epochs
    if config.max_steps > 0:
        total_steps = min(total_steps, config.max_steps)
    module = DaptModule(loaded, config)
    module.total_steps = total_steps
    data = DaptDataModule(train_records, val_records, config, loaded.image_size)
    # Validate at least once, at the end, even for runs shorter than the interval.
    val_every = max(1, min(config.val_every_steps, total_steps))
    patience = max(1, math.ceil(config.patience_steps / val_every))

    checkpoint_cb = EngineCheckpoint(dirpath=str(checkpoints), filename="step{step:07d}-val_loss{val_loss:.4f}",
                                     auto_insert_metric_name=False, monitor="val_loss", mode="min",
                                     save_top_k=config.top_k, save_last=True, ensemble_json=output / "ensemble.json",
                                     config=config)
    early_cb = EarlyStopping(monitor="val_loss", mode="min", patience=patience, check_on_train_epoch_end=False)
    strategy = config.strategy
    if strategy == "auto" and world > 1:
        strategy = "ddp"
    trainer = L.Trainer(
        default_root_dir=str(output), max_epochs=config.max_epochs, max_steps=config.max_steps,
        val_check_interval=val_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        gradient_clip_val=config.gradient_clip_norm, gradient_clip_algorithm="norm",
        accelerator=config.accelerator, devices=config.devices, num_nodes=config.num_nodes, strategy=strategy,
        precision=precision, use_distributed_sampler=False, deterministic=config.deterministic,
        callbacks=[checkpoint_cb, early_cb, _ValidateAtEnd(total_steps), *callbacks], logger=CSVLogger(str(output), name="logs"),
        enable_progress_bar=config.progress_bar, enable_model_summary=False, log_every_n_steps=1,
    )
    ckpt_path = str(resume_path) if resume and resume_path.exists() else None
    with warnings.catch_warnings():
        # GlobalBatchSampler resumes mid-epoch by itself (see DaptDataModule._progress).
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)

    result = FitResult(output_dir=str(output), best_checkpoint=None, best_val_loss=None,
                       last_checkpoint=str(checkpoints / "last.safetensors"),
                       resume_checkpoint=str(resume_path) if resume_path.exists() else None,
                       global_step=int(trainer.global_step), train_samples=len(train_records),
                       val_samples=len(val_records))
    if not trainer.is_global_zero:
        return result
    # Read back from disk rather than from the callback: with ddp_spawn training ran elsewhere.
    ensemble_path = output / "ensemble.json"
    if ensemble_path.is_file():
        ensemble = json.loads(ensemble_path.read_text(encoding="utf-8"))
        result.top_k = ensemble["checkpoints"]
        result.global_step = max(result.global_step, int(ensemble.get("global_step", 0)))
        result.ensemble_json = str(ensemble_path)
    result.stopped_early = result.global_step < total_steps
    if result.top_k:
        best_source = result.top_k[0]["path"]
        result.best_val_loss = float(result.top_k[0]["val_loss"])
        best = output / "best.safetensors"
        shutil.copyfile(best_source, best)
        if label_head_path(best_source).is_file():
            shutil.copyfile(label_head_path(best_source), label_head_path(best))
        result.best_checkpoint = str(best)
    result.summary_json = str(output / "dapt_summary.json")
    _write_json(Path(result.summary_json), {"config": config.to_json(), "result": dataclasses.asdict(result),
                                            "precision": precision, "world_size": world,
                                            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                                            "val_every_steps": val_every, "patience_validations": patience})
    return result


def _step_of(path: str) -> Optional[int]:
    name = Path(path).name
    if name.startswith("step"):
        digits = name[4:].split("-")[0]
        if digits.isdigit():
            return int(digits)
    return None


def write_ensemble(path: Union[str, Path], top_k: Sequence[dict], config: DaptConfig, *, global_step: int = 0) -> Path:
    """The JSON the engine averages over: ``{"checkpoints": [{"path", "val_loss", "step"}, ...]}``, best first.

    ``combine`` names CheXzero's rule: average the probabilities of the checkpoints.
    """
    payload = {"format": "zeroshot-ild-ensemble/1", "base_model": config.model, "loss": config.loss,
               "combine": "mean_probability", "global_step": int(global_step), "checkpoints": list(top_k)}
    return _write_json(Path(path), payload)


def _write_json(path: Path, payload: dict) -> Path:
    from ZeroShotILDLib.outputs import json_text

    # A diverged run's NaN loss is written as null: bare NaN is not JSON for any other reader.
    return atomic_write_text(path, json_text(_jsonable(payload), notes_key=None))


def default_learning_rates(count: int = 5, low: float = 1e-5, high: float = 1e-3) -> list:
    """``count`` learning rates spaced evenly on a log scale over [low, high] (paper 000: five in [1e-5, 1e-3])."""
    return [float(v) for v in np.logspace(math.log10(low), math.log10(high), count)]


def sweep(config: DaptConfig, records: Sequence[PairRecord], learning_rates: Optional[Sequence[float]] = None, *,
          resume: bool = False, callbacks: Sequence = ()) -> SweepResult:
    """Fit once per learning rate (same split, seed and everything else) and pick the lowest validation loss.

    Each run goes to ``<output_dir>/lr_<value>``; ``sweep.json`` and ``sweep.csv`` in
    ``output_dir`` list every run's best validation loss and best checkpoint. With ``resume``,
    finished runs are read back (not repeated) and an interrupted one continues.
    """
    config.validate()
    rates = list(learning_rates) if learning_rates else default_learning_rates()
    output = Path(config.output_dir).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)
    train, val = split_records(records, val_fraction=config.val_fraction, seed=config.seed)
    runs: dict = {}
    for rate in rates:
        run_dir = output / f"lr_{rate:.2e}"
        run_config = dataclasses.replace(config, learning_rate=float(rate), output_dir=str(run_dir))
        runs[rate] = fit(run_config, (), train_records=train, val_records=val, resume=resume, callbacks=callbacks)
    scored = [(r.best_val_loss, rate) for rate, r in runs.items() if r.best_val_loss is not None]
    best_rate = min(scored)[1] if scored else None
    rows = [{"learning_rate": rate, "best_val_loss": r.best_val_loss, "global_step": r.global_step,
             "stopped_early": r.stopped_early, "best_checkpoint": r.best_checkpoint} for rate, r in runs.items()]
    summary_json = _write_json(output / "sweep.json", {"best_learning_rate": best_rate, "runs": rows,
                                                        "config": config.to_json()})
    summary_csv = output / "sweep.csv"
    with atomic_path(summary_csv) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return SweepResult(best_learning_rate=best_rate, best=runs.get(best_rate) if best_rate is not None else None,
                       runs=runs, summary_json=str(summary_json), summary_csv=str(summary_csv))


def read_lightning_checkpoint(path: Union[str, Path]) -> dict:
    """A run's Lightning ``.ckpt`` read weights-only; anything else is refused in one line.

    A pickle carrying Python objects (code that would run on loading), a damaged file or a file
    that is not a DAPT run's checkpoint raises ``InputError``, never a traceback.
    """
    import pickle

    path = Path(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests loading the file unsafely: it is not repeated here.
        raise InputError(f"{path.name} holds pickled Python objects, refused for safety: use the last.ckpt that "
                         "train wrote, or start the run again without --resume") from None
    except Exception as exc:  # noqa: BLE001 - zip/EOF/format errors of damaged files
        raise InputError(f"{path.name} is damaged or not a PyTorch checkpoint ({models._first_line(exc)}): use the "
                         "last.ckpt that train wrote, or start the run again without --resume") from None
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise InputError(f"{path.name} is not a Lightning checkpoint of a DAPT run: give a run's checkpoints/last.ckpt")
    return state


def run_config(lightning_checkpoint: Union[str, Path], **overrides) -> DaptConfig:
    """The settings of the run a ``.ckpt`` belongs to, from what the run folder stored.

    A finished run has ``dapt_summary.json``; an interrupted one has the engine checkpoint written
    with every ``last.ckpt`` (``checkpoints/last.safetensors``, else any top-k file), whose
    metadata carries the run's settings. ``overrides`` (not None) replace stored values, and
    stand in for them when the run folder holds neither (e.g. a ``.ckpt`` copied elsewhere).
    """
    lightning_checkpoint = Path(lightning_checkpoint)
    folder = lightning_checkpoint.parent
    stored: Optional[dict] = None
    summary = folder.parent / "dapt_summary.json"
    if summary.is_file():
        try:
            stored = json.loads(summary.read_text(encoding="utf-8"))["config"]
        except (ValueError, KeyError, TypeError):
            stored = None
    if stored is None:
        candidates = [folder / "last.safetensors", *sorted(folder.glob("step*.safetensors"), reverse=True)]
        for candidate in candidates:
            if candidate.is_file():
                meta = models.read_checkpoint_metadata(candidate) or {}
                if isinstance(meta.get("training"), dict):
                    stored = meta["training"]
                    break
    given = {k: v for k, v in overrides.items() if v is not None}
    if stored is None and "model" not in given:
        raise InputError(f"the folder of {lightning_checkpoint.name} holds neither dapt_summary.json nor the run's "
                         "last.safetensors: give the run's settings with --model (and --loss, --classes as trained)")
    fields = {f.name for f in dataclasses.fields(DaptConfig)}
    values = {k: v for k, v in (stored or {}).items() if k in fields}
    values.update(given)
    values.setdefault("output_dir", str(folder.parent))
    values["class_names"] = tuple(values.get("class_names") or ())
    try:
        config = DaptConfig(**values)
    except TypeError as exc:
        raise InputError(f"the run's stored settings cannot be read ({models._first_line(exc)}): give --model") from None
    config.validate()
    return config


def export(lightning_checkpoint: Union[str, Path], output: Union[str, Path], config: Optional[DaptConfig] = None,
           **settings) -> Path:
    """Convert a Lightning ``.ckpt`` of a DAPT run into an engine checkpoint (``dapt:<output>``).

    ``config`` defaults to the run's settings as stored in its folder, with ``settings`` (e.g.
    ``model=``, ``loss=``) replacing stored values (:func:`run_config`). The ``.ckpt`` is read
    weights-only first (:func:`read_lightning_checkpoint`), so a hostile file is refused before
    anything else is asked of the user.
    """
    lightning_checkpoint = Path(lightning_checkpoint)
    state = read_lightning_checkpoint(lightning_checkpoint)
    if config is None:
        config = run_config(lightning_checkpoint, **settings)
    loaded = models.load_model(config.model, checkpoint=config.checkpoint, weights_dir=config.weights_dir, device="cpu")
    module = DaptModule(loaded, config)
    try:
        module.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        raise InputError(f"{lightning_checkpoint.name} does not match model {config.model} with loss {config.loss} "
                         f"({models._first_line(exc)}): give the run's --model and --loss") from None
    return module.export(output, global_step=int(state.get("global_step", 0)), epoch=int(state.get("epoch", 0)))
