"""Domain-adaptive pre-training (DAPT): contrastive fine-tuning of a registry model on (montage, text) pairs.

Lightning supplies the loop, checkpointing, early stopping, precision, devices and nodes; this
module says only what is specific to the method: which loss, which views, which text.

Paper 000's recipe is the default (``recipe="paper000"``): the impression section, whole text,
10 % of patients held out for validation, validation and a checkpoint every 100 steps, early
stopping after 1,000 steps without improvement, the five best checkpoints by validation loss
kept (for ensembles), at most 10 epochs, and a sweep over five learning rates in [1e-5, 1e-3]
picking the best by validation loss. ``recipe="paper001"`` trains on findings+impression with
n = 3 sentences sampled per step (paper 001's sentence sampling); paper 001 also supplies the
relaxed positive-pair similarity, SLIP and UniCLIP; paper 002 UniCL and DLILP. Augmentation is
geometric only unless ``intensity_augment`` is set: brightness/contrast change HU-window density.

Every validation logs, besides ``val_loss``, the loss's chance level (``val_chance``: the loss
with every logit equal), the zero-shot AUROC of the validation labels with the run's own prompt
(``val_auroc``, when the manifest has ILD labels of both classes), the spread of the image
embeddings (``val_mean_cosine``, ``val_effective_rank``) and image->text retrieval
(``val_recall_at_1``/``_5``). Every validation gets a verdict (:func:`validation_verdict`:
collapsed, at chance or healthy); best and the top-k are chosen among healthy checkpoints only,
each exported checkpoint records its own verdict, and a run whose embeddings collapse or whose
loss stays at chance says so (``FitResult.health``, one warning line with advice, the summary).
The warm-up is 10 % of the run's real steps (at most 100) unless given.

Output folder of :func:`fit`::

    checkpoints/step0000100-val_loss1.2345.safetensors   top-k engine checkpoints (dapt:<path>)
    checkpoints/last.safetensors                         the latest weights, engine format
    checkpoints/last.ckpt                                Lightning state for ``resume=True``
    best.safetensors                                     copy of the best (healthy) top-k checkpoint
    curves.png                                           loss vs chance, AUROC, learning rate per step
    ensemble.json                                        top-k paths, best first, for averaging
    dapt_summary.json                                    settings, split sizes, losses, steps
    logs/metrics.csv                                     loss and health curves (one folder per run,
                                                         appended to on resume; --logger adds others)

Every ``.safetensors`` file is written by ``ZeroShotILDLib.models.save_checkpoint`` (architecture,
preprocessing and these training settings in its metadata, no pickled objects), so the engine
loads it with ``load_model("dapt:<path>")``. A DLILP run writes the image-label head and class
prototypes beside each checkpoint as ``<name>.labelhead.safetensors`` (:func:`load_label_head`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ZeroShotILDLib import models
from ZeroShotILDLib import csv_files
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
# The settings and the names they take live in a torch-free module (the CLI's --help reads them).
from .dapt_config import (  # noqa: F401
    CHANCE_MARGIN, COLLAPSE_COSINE, COLLAPSE_SPREAD_RATIO, DEFAULT_MAX_EPOCHS, DEFAULT_RECIPE, LOGGERS, LOGIT_SCALE_MAX,
    LOSS_VIEWS, LOSSES, MONITORS, OPTIMIZERS, RECIPES, DaptConfig, default_workers, recipe_config, warmup_for,
)
from .files import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

LABEL_HEAD_SUFFIX = ".labelhead.safetensors"
_LABEL_HEAD_KEY = "zeroshot_ild_label_head"


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
    #: The checkpoint criterion and the best checkpoint's value of it.
    monitor: str = "val_loss"
    best_score: Optional[float] = None
    #: Which limit ends the run ("max_steps", "max_epochs", "max_epochs (default)").
    limited_by: Optional[str] = None
    #: Collapse / chance verdict and the last validation's health metrics (:func:`health_verdict`).
    health: dict = field(default_factory=dict)
    #: Relaxed losses: how often eq. 3 changed a positive pair (None for other losses).
    relaxation: Optional[dict] = None
    #: Set when SIGTERM/SIGINT stopped the run: the signal's name; the run resumes with resume=True.
    interrupted: Optional[str] = None


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
        self._val_store: list = []
        #: Health metrics of every validation, ``(global_step, {name: value})``; the first is the
        #: base model's (Lightning's sanity validation before any step).
        self.health_history: list = []
        #: Positive pairs (and steps) where eq. 3 changed the similarity, over all training steps.
        self.relax_counts = {"pairs_active": 0, "pairs": 0, "steps_active": 0, "steps": 0}
        #: Warm-up steps of the schedule (:func:`warmup_for`); set by :func:`fit`.
        self.warmup_steps = 1
        #: Training loss / its chance level, summed since the last validation (the verdict's advice).
        self._train_ratio = [0.0, 0]
        #: Verdict of the latest validation (:func:`validation_verdict`); the checkpoint callback reads it.
        self.current_verdict: Optional[dict] = None

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

    @property
    def _relaxes(self) -> bool:
        cfg = self.config
        return cfg.loss == "relaxed" or (cfg.relaxed_positives and cfg.loss in ("clip", "slip", "uniclip"))

    def _count_relaxation(self, image: dict, text: torch.Tensor) -> None:
        """Count the positive image-text pairs at or above t (where eq. 3 is not the identity)."""
        if not (self._relaxes and self.training):
            return
        cosines = torch.cat([(image[n] * text).sum(dim=1) for n in image if n in ("weak", "original")])
        active = int(losses.relaxation_active(cosines.detach(), threshold=self.config.relax_threshold).sum())
        counts = self.relax_counts
        counts["pairs_active"] += active
        counts["pairs"] += int(cosines.numel())
        counts["steps_active"] += int(active > 0)
        counts["steps"] += 1

    def chance_loss(self, n: int, labels: Optional[torch.Tensor] = None, has_text: Optional[torch.Tensor] = None) -> float:
        """The loss when every logit is equal (an encoder that tells nothing apart), for n samples.

        CLIP/relaxed/UniCL: ln n; SLIP: ln n + w ln(2n - 1); UniCLIP: ln(3n - 2); DLILP: its two
        terms with uniform logits (from the classes present and the samples with text).
        """
        cfg = self.config
        if n < 1:
            return float("nan")
        if cfg.loss in ("clip", "relaxed", "unicl"):
            return math.log(n)
        if cfg.loss == "slip":
            return math.log(n) + cfg.ssl_weight * math.log(max(1, 2 * n - 1))
        if cfg.loss == "uniclip":
            return math.log(3 * n - 2)
        text = int(has_text.sum()) if has_text is not None else n
        label_term = float(losses.prototype_unicl_loss(torch.ones(n, 1), torch.ones(labels.shape[1], 1),
                                                       labels.detach().cpu().float(), 0.0))
        return label_term + cfg.dlilp_text_weight * (math.log(text) if text > 0 else 0.0)

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
        self._count_relaxation(image, text)
        labels = has_text = None
        if cfg.loss in ("unicl", "dlilp"):
            labels = all_gather_no_grad(batch["labels"].float())[valid]
        if cfg.loss == "dlilp" or not self.training:
            has_text = all_gather_no_grad(batch["has_text"].bool())[valid]
        if not self.training:
            entry = {"image": first.detach(), "target": all_gather_no_grad(batch["target"].long())[valid]}
            if cfg.loss != "dlilp":
                # Validation pairs without text (labelled images kept for the zero-shot AUROC)
                # take no part in a loss that needs text.
                image = {n: v[has_text] for n, v in image.items()}
                text = text[has_text]
                labels = labels[has_text] if labels is not None else None
                first = image[names[0]]
            entry.update(paired_image=first.detach(), text=text[has_text].detach() if cfg.loss == "dlilp" else text.detach())
            if cfg.loss == "dlilp":
                entry["paired_image"] = entry["image"][has_text]
            self._val_store.append(entry)
        self._chance = self.chance_loss(int(first.shape[0]), labels, has_text if cfg.loss == "dlilp" else None)
        if first.shape[0] == 0:
            return None, 0
        if cfg.loss in ("clip", "relaxed"):
            loss = losses.clip_loss(first, text, scale, relaxed=cfg.loss == "relaxed" or cfg.relaxed_positives, **relax)
        elif cfg.loss == "slip":
            loss = losses.slip_loss(image["weak"], text, image["strong1"], image["strong2"], scale,
                                    ssl_weight=cfg.ssl_weight, ssl_temperature=cfg.ssl_temperature,
                                    relaxed=cfg.relaxed_positives, **relax)
        elif cfg.loss == "uniclip":
            loss = losses.uniclip_loss(image["original"], image["weak"], text, scale, relaxed=cfg.relaxed_positives, **relax)
        elif cfg.loss == "unicl":
            truths, statements = losses.split_statement_labels(labels, cfg.class_names)
            loss = losses.unicl_loss(first, text, truths, scale, statements=statements)
        else:  # dlilp
            label_features = gather(self.label_head(raw_views[names[0]]))
            loss = losses.dlilp_loss(label_features, self.label_head.prototypes, labels, first, text, has_text,
                                     self.label_head.logit_scale.exp(), scale, text_weight=cfg.dlilp_text_weight)
        return loss, first.shape[0]

    def training_step(self, batch, batch_idx):
        loss, size = self.compute_loss(batch)
        # Every rank holds the same global loss, so no cross-rank reduction is needed.
        self.log("train_loss", loss, batch_size=size, on_step=True, on_epoch=False, prog_bar=True)
        self.log("logit_scale", self.clip.logit_scale.detach().exp(), batch_size=size, on_step=True, on_epoch=False)
        self.log("train_chance", self._chance, batch_size=size, on_step=True, on_epoch=False)
        # The learning rate this step used (the schedule steps after the optimizer).
        self.log("lr", float(self.trainer.optimizers[0].param_groups[0]["lr"]) if self._trainer is not None
                 else self.config.learning_rate, batch_size=size, on_step=True, on_epoch=False)
        if loss is not None and self._chance and math.isfinite(self._chance):
            self._train_ratio[0] += float(loss.detach()) / self._chance
            self._train_ratio[1] += 1
        if self._relaxes:
            c = self.relax_counts
            self.log("relax_active_fraction", c["pairs_active"] / max(1, c["pairs"]), batch_size=size,
                     on_step=True, on_epoch=False)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_store = []

    def validation_step(self, batch, batch_idx):
        loss, size = self.compute_loss(batch)
        if size == 0:  # a batch of text-less (AUROC-only) pairs
            return None
        self._val_store[-1].update(loss=float(loss) * size, chance=self._chance * size, size=size)
        # Identical on every rank already; sync_dist only keeps Lightning's bookkeeping uniform.
        self.log("val_loss", loss, batch_size=size, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("val_chance", self._chance, batch_size=size, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def _prompt_pair(self) -> tuple:
        """(prompt, negative) of the validation AUROC: ``--prompt``/``--negative``, else the montages' prompt."""
        return validation_prompts(self.config)

    def on_validation_epoch_end(self) -> None:
        if not self._val_store:
            return
        store = self._val_store
        self._val_store = []
        image = torch.cat([s["image"] for s in store]).float()
        target = torch.cat([s["target"] for s in store]).cpu().numpy()
        count = sum(s.get("size", 0) for s in store)
        losses_seen = {"val_loss": sum(s.get("loss", 0.0) for s in store) / count,
                       "val_chance": sum(s.get("chance", 0.0) for s in store) / count} if count else {}
        metrics = embedding_health(image, torch.cat([s["text"] for s in store]).float(),
                                   torch.cat([s["paired_image"] for s in store]).float())
        metrics["val_pairs"] = float(sum(int(s["text"].shape[0]) for s in store))
        known = target >= 0
        if known.any() and len(set(target[known].tolist())) == 2:
            from .metrics import roc_auc

            positive, negative = self._prompt_pair()
            with torch.no_grad():
                tokens = self.tokenizer([positive, negative]).to(image.device)
                prompts = F.normalize(self.clip.encode_text(tokens).float(), dim=-1)
            # The engine's softmax over (prompt, negative) is monotone in this difference.
            score = (image @ prompts[0] - image @ prompts[1]).cpu().numpy()
            metrics["val_auroc"] = roc_auc(target[known], score[known])
        step = int(self.trainer.global_step) if self._trainer is not None else 0
        sanity = self._trainer is not None and self.trainer.sanity_checking
        if sanity and step > 0:
            return  # a resumed run's sanity pass repeats the last validation
        if not sanity and self._train_ratio[1]:
            metrics["train_loss_ratio"] = self._train_ratio[0] / self._train_ratio[1]
        self._train_ratio = [0.0, 0]
        entry = {**metrics, **losses_seen}
        self.health_history.append((step, entry))
        initial = self.health_history[0][1] if self.health_history[0][0] == 0 and len(self.health_history) > 1 else None
        self.current_verdict = None if sanity else validation_verdict(entry, initial, self.config, step=step)
        if sanity:
            # The base model's row (step 0) in metrics.csv: the baseline every later row is read against.
            if self._trainer is not None and self.trainer.is_global_zero:
                for logger in self.trainer.loggers:
                    logger.log_metrics({k: float(v) for k, v in entry.items()}, step=-getattr(logger, "STEP_OFFSET", 0))
            return
        for name, value in metrics.items():
            self.log(name, float(value), on_step=False, on_epoch=True, sync_dist=True)
        self.log("val_healthy", float(self.current_verdict["healthy"]), on_step=False, on_epoch=True, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["zeroshot_ild_dapt"] = {"relax_counts": dict(self.relax_counts),
                                           "health_history": [[s, dict(m)] for s, m in self.health_history]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("zeroshot_ild_dapt") or {}
        self.relax_counts.update({k: int(v) for k, v in (saved.get("relax_counts") or {}).items()})
        self.health_history = [(int(s), {k: float(v) for k, v in m.items()}) for s, m in saved.get("health_history") or []]

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
        total, warmup = int(self.total_steps), int(self.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # -- export ----------------------------------------------------------------------------
    def export(self, path: Union[str, Path], **training_extra) -> Path:
        """Write the current CLIP weights as an engine checkpoint (plus the DLILP label head)."""
        training = self.config.to_json()
        training.update(training_extra)
        # The run's health so far travels with the weights: the engine reads it to decide whether
        # this checkpoint's scores mean anything (a collapsed or at-chance run's do not).
        # The verdict is this checkpoint's own (its validation's), not the run's last one: a best
        # checkpoint chosen before a later collapse is healthy, a collapsed one says so.
        step = int(training_extra.get("global_step", -1))
        verdict = checkpoint_verdict(self.health_history, self.config, step)
        if verdict:
            training["health"] = verdict
        path = models.save_checkpoint(path, self.clip, self.spec, extra={"training": _jsonable(training)})
        if self.label_head is not None:
            save_label_head(label_head_path(path), self.label_head)
        return path


def embedding_health(image: torch.Tensor, text: torch.Tensor, paired_image: Optional[torch.Tensor] = None) -> dict:
    """Spread of L2-normalised image embeddings (N, D) and image->text retrieval of the pairs
    ``paired_image`` (default ``image``) / ``text``, row i of each paired.

    ``val_mean_cosine``: mean cosine over all pairs of different images (1 = every image maps to
    one point). ``val_effective_rank``: exp of the entropy of the normalised singular values
    (Roy & Vetterli 2007; 1 = one direction, up to min(N, D)). ``val_recall_at_k``: share of
    images whose own text is among the k most similar texts (chance k/N), for k < N.
    """
    image = image.double()
    n = image.shape[0]
    out: dict = {}
    if n >= 2:
        gram = image @ image.t()
        out["val_mean_cosine"] = float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))
    singular = torch.linalg.svdvals(image)
    p = singular / singular.sum().clamp_min(1e-12)
    p = p[p > 0]
    out["val_effective_rank"] = float(torch.exp(-(p * p.log()).sum()))
    paired = (image if paired_image is None else paired_image.double())
    similarity = paired @ text.double().t()
    rank = (similarity > similarity.diagonal()[:, None]).sum(dim=1)
    for k in (1, 5):
        if k < paired.shape[0]:
            out[f"val_recall_at_{k}"] = float((rank < k).double().mean())
    return out


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Share of the peak learning rate used by optimizer step ``step`` (0-based) of ``total``.

    Linear warm-up reaching 1 at step ``warmup - 1``, then cosine decay to 0 at ``total``.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def validation_prompts(config: DaptConfig) -> tuple:
    """(prompt, negative) scored by the validation AUROC.

    ``val_prompt`` (else the label's name for a label other than ``ild``, else the prompt the
    montages were built with) and ``val_negative`` (else ``no <prompt>``): no ILD wording unless
    the label is ``ild`` or the prompt says so.
    """
    from ZeroShotILDLib.settings import AnalysisSettings

    settings = AnalysisSettings.from_dict(config.montage_settings) if config.montage_settings else AnalysisSettings()
    if config.val_prompt:
        prompt = str(config.val_prompt).strip()
    elif config.val_label.strip().lower() not in ("ild", "label_ild"):
        prompt = config.val_label.strip().lower().removeprefix("label_").replace("_", " ")
    else:
        return settings.prompts[0], (str(config.val_negative).strip() if config.val_negative else settings.negative_for(0))
    return prompt, (str(config.val_negative).strip() if config.val_negative else f"no {prompt}")


def validation_verdict(metrics: dict, initial: Optional[dict], config: DaptConfig, *, step: int = -1) -> dict:
    """Health of one validation: ``collapsed``, ``at_chance`` and ``healthy`` (neither).

    ``collapsed``: the mean pairwise image cosine is at least ``config.collapse_cosine`` and, when
    the base model was measured (``initial``, the validation before any step), the spread
    ``1 - cosine`` is at most ``COLLAPSE_SPREAD_RATIO`` of the base model's (a base model whose
    montage embeddings were already that close is not called collapsed by training).
    ``at_chance``: the validation loss is not more than ``config.chance_margin`` (relative) below
    the loss's chance level ``val_chance``. The chance level and the values read travel along.
    """
    cosine = metrics.get("val_mean_cosine")
    base = initial.get("val_mean_cosine") if initial else None
    collapsed = bool(cosine is not None and cosine >= config.collapse_cosine
                     and (base is None or (1.0 - cosine) <= COLLAPSE_SPREAD_RATIO * (1.0 - base)))
    loss, chance = metrics.get("val_loss"), metrics.get("val_chance")
    ratio = loss / chance if (chance and loss is not None and math.isfinite(loss)) else None
    at_chance = ratio is None or ratio >= 1.0 - config.chance_margin
    out = {"step": int(step), "collapsed": collapsed, "at_chance": bool(at_chance),
           "healthy": not collapsed and not at_chance, "val_loss": loss, "val_chance": chance,
           "chance_margin": config.chance_margin, "val_mean_cosine": cosine, "base_mean_cosine": base,
           "collapse_cosine": config.collapse_cosine}
    if "val_auroc" in metrics:
        out["val_auroc"] = metrics["val_auroc"]
    return out


def validation_verdicts(history: Sequence, config: DaptConfig) -> list:
    """:func:`validation_verdict` of every validation after training started, in order."""
    history = list(history)
    initial = history[0][1] if history and history[0][0] == 0 else None
    return [validation_verdict(m, initial, config, step=s) for s, m in history if s > 0]


def checkpoint_verdict(history: Sequence, config: DaptConfig, step: int) -> dict:
    """What an exported checkpoint's metadata says about its health (``training.health``).

    The verdict of the validation at ``step`` (the checkpoint's own), else of the latest one before
    it, with ``validated`` saying which; ``run`` adds the whole run's verdict so far. The engine
    reads ``collapsed`` and ``at_chance`` (``ZeroShotILDLib.results.model_warning``).
    """
    verdicts = validation_verdicts(history, config)
    if not verdicts:
        return {}
    own = [v for v in verdicts if v["step"] == step]
    before = [v for v in verdicts if v["step"] <= step] if step >= 0 else verdicts
    chosen = own[-1] if own else (before[-1] if before else verdicts[-1])
    run = health_verdict(history, config)
    return {**chosen, "validated": bool(own), "validations": len(verdicts),
            "run": {"collapsed": run.get("collapsed"), "at_chance": run.get("at_chance"),
                    "healthy_steps": run.get("healthy_steps")}}


def health_verdict(history: Sequence, config: DaptConfig, *, warmup_steps: Optional[int] = None,
                   best_step: Optional[int] = None) -> dict:
    """Whether a run collapsed or stayed at chance, from its validations' health metrics.

    ``collapsed``: the last validation collapsed (:func:`validation_verdict`); ``collapsed_steps``
    every validation that did. ``at_chance``: no validation after training started scored a loss
    more than ``config.chance_margin`` (relative) below the chance level. ``verdicts``: every
    validation's verdict; ``healthy_steps`` the steps whose checkpoints may be chosen as best.
    ``warning`` is one line saying what went wrong and what to try, from what happened (the
    training loss against its chance level, the warm-up), or None.
    """
    history = list(history)
    if not history:
        return {}
    initial = history[0][1] if history[0][0] == 0 else None
    trained = [m for step, m in history if step > 0] or [history[-1][1]]
    verdicts = validation_verdicts(history, config) or [validation_verdict(trained[-1], None, config)]
    last = trained[-1]
    out: dict = {"validations": len(trained), "last": last, "initial": initial, "verdicts": verdicts,
                 "healthy_steps": [v["step"] for v in verdicts if v["healthy"]],
                 "collapsed_steps": [v["step"] for v in verdicts if v["collapsed"]]}
    cosine = last.get("val_mean_cosine")
    out["collapsed"] = bool(verdicts[-1]["collapsed"])
    ratios = [m["val_loss"] / m["val_chance"] for m in trained
              if m.get("val_chance") and math.isfinite(m.get("val_loss", float("nan")))]
    out["at_chance"] = bool(ratios) and min(ratios) >= 1.0 - config.chance_margin
    problems, advice = [], []
    if out["collapsed"] or out["collapsed_steps"]:
        before = f" (base model {initial['val_mean_cosine']:.3f})" if initial and "val_mean_cosine" in initial else ""
        if out["collapsed"]:
            problems.append(f"image embeddings collapsed: mean pairwise cosine {cosine:.3f}{before}, "
                            f"effective rank {last.get('val_effective_rank', float('nan')):.2f}")
        else:
            problems.append(f"image embeddings collapsed at step {out['collapsed_steps'][0]}{before}")
        advice.append("try a lower --lr (the updates destroyed the image features)")
    if out["at_chance"]:
        best = min(trained, key=lambda m: m.get("val_loss", float("inf")))
        problems.append(f"validation loss stayed at chance (best {best['val_loss']:.4f}, chance {best['val_chance']:.4f})")
        train_ratios = [m["train_loss_ratio"] for m in trained if "train_loss_ratio" in m]
        steps_done = max((s for s, _ in history), default=0)
        if warmup_steps is not None and steps_done < warmup_steps:
            advice.append(f"the run ended after {steps_done} steps, inside its {warmup_steps}-step warm-up: train longer")
        elif train_ratios and train_ratios[-1] < 1.0 - config.chance_margin:
            advice.append(f"the training loss fell to {train_ratios[-1]:.2f} of chance while validation did not: the "
                          "model memorises its training texts; add pairs or more distinct texts, or stop earlier")
        elif train_ratios:
            advice.append(f"the training loss stayed at chance too ({train_ratios[-1]:.2f} of it): train longer or "
                          "try a higher --lr; check that texts describe their images")
        else:
            advice.append("train longer, or check the texts")
    # Retrieval below chance (k / N) says the image and text towers pull apart, even with a loss below chance.
    pairs = last.get("val_pairs")
    below = [f"recall@{k} {last[f'val_recall_at_{k}']:.3f} < chance {k / pairs:.3f}" for k in (1, 5)
             if pairs and f"val_recall_at_{k}" in last and last[f"val_recall_at_{k}"] < k / pairs]
    out["notes"] = [f"image->text retrieval below chance at the last validation ({', '.join(below)})"] if below else []
    healthy_note = ""
    if problems and verdicts and not out["healthy_steps"]:
        healthy_note = "; no validation was healthy, so no checkpoint of this run is"
    elif problems and best_step is not None:
        healthy_note = f"; best is the healthy step {best_step}"
    out["advice"] = advice
    out["warning"] = ("run is not learning: " + "; ".join(problems) + healthy_note + ": " + "; ".join(advice)
                      if problems else None)
    return out


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

    Top-k is chosen among healthy checkpoints (:func:`validation_verdict`): an unhealthy one
    (collapsed, or at chance) ranks after every healthy one, whatever its score, and is left out
    of ``ensemble_json`` once any healthy checkpoint exists. A collapse pulls the validation loss
    towards chance from above, so the lowest loss alone would often pick a collapsed model.
    """

    FILE_EXTENSION = ".safetensors"
    #: Added to (min) or subtracted from (max) an unhealthy checkpoint's score in Lightning's top-k
    #: bookkeeping: a two-tier ranking, healthy first; the real scores are kept in ``scores``.
    UNHEALTHY_OFFSET = 1e6

    def __init__(self, *args, ensemble_json: Union[str, Path], config: DaptConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.ensemble_json = Path(ensemble_json)
        self.config = config
        #: checkpoint path -> {"val_loss", "val_auroc"} at the time it was written.
        self.scores: dict = {}
        #: checkpoint path -> its validation's verdict (:func:`validation_verdict`).
        self.verdicts: dict = {}

    def _save_monitor_checkpoint(self, trainer, monitor_candidates: dict) -> None:
        current = monitor_candidates.get(self.monitor)
        verdict = getattr(trainer.lightning_module, "current_verdict", None)
        if current is not None and verdict is not None and not verdict["healthy"]:
            offset = self.UNHEALTHY_OFFSET if self.mode == "min" else -self.UNHEALTHY_OFFSET
            current = current + offset
        if self.check_monitor_top_k(trainer, current):
            self._update_best_and_save(current, trainer, monitor_candidates)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        path = Path(filepath)
        if path.stem.startswith(self.CHECKPOINT_NAME_LAST):
            trainer.save_checkpoint(str(path.with_name(RESUME_NAME)), weights_only=False)
        metrics = trainer.callback_metrics
        scores = {k: float(metrics[k]) for k in MONITORS if k in metrics}
        self.scores[str(Path(filepath).resolve())] = scores
        verdict = getattr(trainer.lightning_module, "current_verdict", None)
        if verdict is not None and not path.stem.startswith(self.CHECKPOINT_NAME_LAST):
            self.verdicts[str(path.resolve())] = {k: verdict[k] for k in ("healthy", "collapsed", "at_chance")}
        if trainer.is_global_zero:
            extra = {"global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch), **scores}
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
            sign = 1.0 if self.mode == "min" else -1.0
            ranked = sorted(((sign * float(v), str(Path(p).resolve())) for p, v in self.best_k_models.items()))
            top_k = []
            for _, p in ranked:
                scores = self.scores.get(p, {})
                verdict = self.verdicts.get(p, {"healthy": True, "collapsed": False, "at_chance": False})
                top_k.append({"path": p, "val_loss": scores.get("val_loss"), "val_auroc": scores.get("val_auroc"),
                              "monitor": self.monitor, "score": scores.get(self.monitor), "step": _step_of(p),
                              **verdict})
            # Only healthy checkpoints are ensembled (and become best) once there is one.
            if any(c["healthy"] for c in top_k):
                top_k = [c for c in top_k if c["healthy"]]
            write_ensemble(self.ensemble_json, top_k, self.config, global_step=int(trainer.global_step))

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["scores"] = {p: dict(v) for p, v in self.scores.items()}
        state["verdicts"] = {p: dict(v) for p, v in self.verdicts.items()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.scores = {str(p): {k: float(x) for k, x in v.items()} for p, v in (state_dict.get("scores") or {}).items()}
        self.verdicts = {str(p): {k: bool(x) for k, x in v.items()} for p, v in (state_dict.get("verdicts") or {}).items()}


class HealthAwareEarlyStopping(EarlyStopping):
    """EarlyStopping that counts an unhealthy validation (:func:`validation_verdict`) as no improvement:
    a collapse that lowers the loss must not reset the patience any more than it may become best."""

    def _run_early_stopping_check(self, trainer) -> None:
        self.verdict = getattr(trainer.lightning_module, "current_verdict", None)
        super()._run_early_stopping_check(trainer)

    def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple:
        verdict = getattr(self, "verdict", None)
        if verdict is None or verdict.get("healthy", True) or not torch.isfinite(current):
            return super()._evaluate_stopping_criteria(current)
        if not torch.isfinite(self.best_score):
            return False, None  # nothing healthy yet to be patient about
        return super()._evaluate_stopping_criteria(self.best_score.clone().to(current.device))


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


class RunInterrupted(Exception):
    """SIGTERM/SIGINT stopped a run after a resumable checkpoint was written.

    ``exit_code`` is 128 + the signal number (143 for SIGTERM, 130 for SIGINT), what a shell
    reports for a process ended by that signal; ``result`` is the partial :class:`FitResult`.
    """

    def __init__(self, signal_name: str, exit_code: int, result: "FitResult"):
        super().__init__(f"interrupted by {signal_name} at step {result.global_step}: a resumable checkpoint is in "
                         f"{Path(result.output_dir) / 'checkpoints' / RESUME_NAME}; resume with --resume")
        self.signal_name = signal_name
        self.exit_code = exit_code
        self.result = result


class _SignalCatcher(L.Callback):
    """Turn SIGTERM/SIGINT into a stop at the next step boundary, then write a resumable checkpoint.

    SIGTERM is Lightning's own notifier (it raises ``SIGTERMException`` after the current batch);
    SIGINT is routed to the same path here instead of Lightning's KeyboardInterrupt handling,
    which would exit 1 in the middle of a step without a checkpoint.
    """

    def __init__(self, checkpoints: Path):
        self.checkpoints = checkpoints
        self.signal_name: Optional[str] = None
        self._previous: dict = {}

    def install(self, trainer) -> None:
        import signal

        def handler(signum, frame):
            self.signal_name = signal.Signals(signum).name
            # Lightning stops after the current batch and raises SIGTERMException.
            trainer._signal_connector.received_sigterm = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)

    def uninstall(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        # A signal can also surface as another error: Ctrl+C reaches data-loader workers too, and
        # the loader then fails between two steps. The state is a step boundary either way.
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)) and self.signal_name is None:
            return
        self.signal_name = self.signal_name or ("SIGINT" if isinstance(exception, KeyboardInterrupt) else "SIGTERM")
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(str(self.checkpoints / RESUME_NAME), weights_only=False)
        if trainer.is_global_zero:
            pl_module.export(self.checkpoints / "last.safetensors", global_step=int(trainer.global_step),
                             epoch=int(trainer.current_epoch))


def plan_steps(config: DaptConfig, steps_per_epoch: int) -> tuple:
    """(optimizer steps of the run, max_epochs for Lightning, which limit ends it).

    An explicit ``max_steps`` alone is never cut by an epoch limit; with neither limit given the
    run lasts paper 000's 10 epochs; with both, the earlier wins.
    """
    steps = int(config.max_steps) if config.max_steps and config.max_steps > 0 else None
    epochs = int(config.max_epochs) if config.max_epochs else None
    if steps is None and epochs is None:
        return steps_per_epoch * DEFAULT_MAX_EPOCHS, DEFAULT_MAX_EPOCHS, f"max_epochs (default {DEFAULT_MAX_EPOCHS})"
    if epochs is None:
        return steps, -1, "max_steps"
    if steps is None:
        return steps_per_epoch * epochs, epochs, "max_epochs"
    by_epochs = steps_per_epoch * epochs
    if by_epochs < steps:
        return by_epochs, epochs, "max_epochs"
    return steps, epochs, "max_steps"


#: Settings that may differ when a run is resumed (they do not change what is trained).
RESUMABLE_CHANGES = ("output_dir", "max_steps", "max_epochs", "progress_bar", "num_workers", "logger",
                     "patience_steps")


def check_resume_settings(config: DaptConfig, stored: Optional[dict]) -> None:
    """Refuse (one line) a resume whose settings differ from the run's, listing each difference."""
    if not stored:
        return
    given = config.to_json()
    differ = []
    for name, value in given.items():
        if name in RESUMABLE_CHANGES or name not in stored:
            continue
        old = stored[name]
        if _jsonable(old) != _jsonable(value) and not (isinstance(old, (int, float)) and isinstance(value, (int, float))
                                                      and float(old) == float(value)):
            differ.append(f"{name} ({_short(old)} -> {_short(value)})")
    if differ:
        raise InputError(f"--resume with settings that differ from the run's: {', '.join(differ)}: give the run's "
                         "own flags (or its --config), or start a new run in another --out")


def _short(value) -> str:
    text = json.dumps(_jsonable(value)) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def _stored_settings(output: Path) -> Optional[dict]:
    summary = output / "dapt_summary.json"
    if summary.is_file():
        try:
            return json.loads(summary.read_text(encoding="utf-8"))["config"]
        except (ValueError, KeyError, TypeError):
            return None
    last = output / "checkpoints" / "last.safetensors"
    if last.is_file():
        meta = models.read_checkpoint_metadata(last) or {}
        if isinstance(meta.get("training"), dict):
            return meta["training"]
    return None


def _check_logger(config: DaptConfig) -> None:
    """One line before any work when the chosen logger's package is not installed."""
    import importlib.util

    if config.logger == "tensorboard" and not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        raise InputError("--logger tensorboard needs TensorBoard: pip install tensorboard (or use --logger csv)")
    if config.logger == "mlflow" and importlib.util.find_spec("mlflow") is None:
        raise InputError("--logger mlflow needs MLflow: pip install mlflow (or use --logger csv)")


class _StepCSVLogger(CSVLogger):
    """``metrics.csv`` with every row numbered by the optimizer steps completed when it was measured,
    as the checkpoints are (``step0000020-…`` and the validation row ``20``; the base model's row is
    ``0``, the first training step's ``1``). Lightning passes the 0-based index of the step."""

    #: Added to Lightning's step; the base model's row is written with ``-STEP_OFFSET``.
    STEP_OFFSET = 1

    def log_metrics(self, metrics, step=None) -> None:
        super().log_metrics(metrics, None if step is None else int(step) + self.STEP_OFFSET)


def _loggers(config: DaptConfig, output: Path) -> list:
    """CSV always (``logs/metrics.csv``, one folder per run, appended to on resume), plus the chosen one."""
    
    loggers = [_StepCSVLogger(str(output), name="logs", version="", flush_logs_every_n_steps=max(1, config.val_every_steps))]
    _check_logger(config)
    if config.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(str(output), name="tensorboard", version=""))
    elif config.logger == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        loggers.append(MLFlowLogger(experiment_name="zeroshot-ild-dapt", run_name=output.name,
                                    tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or (output / "mlruns").as_uri()))
    return loggers


class _Throughput(L.Callback):
    """Log ``samples_per_s``: pairs of the global batch per second of each training step (data
    loading included, validation not)."""

    def __init__(self):
        self._started: Optional[float] = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import time

        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        if self._started is None:
            return
        elapsed = time.perf_counter() - self._started
        samples = pl_module.config.batch_size * max(1, trainer.world_size)
        if elapsed > 0:
            pl_module.log("samples_per_s", samples / elapsed, on_step=True, on_epoch=False, batch_size=samples)


def _plot_curves(metrics_csv: Path, path: Path) -> Optional[Path]:
    """``curves.png`` beside the summary; a run is never failed by its plot (one warning line)."""
    if not metrics_csv.is_file():
        return None
    try:
        from .plots import plot_training_curves

        return plot_training_curves(metrics_csv, path)
    except Exception as exc:  # matplotlib missing or a broken font cache: the run itself is done
        log.warning("no curves plot (%s): the numbers are in %s", exc, metrics_csv)
        return None


class _FlushLogs(L.Callback):
    """Write the logged metrics to disk after every validation (a crash keeps the curves so far)."""

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        for logger in trainer.loggers:
            logger.save()


class _PreviousLogs:
    """Keeps a resumed run's ``metrics.csv`` rows: Lightning's CSV writer starts the file afresh."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list = []
        if path.is_file():
            with path.open(newline="", encoding="utf-8") as handle:
                self.rows = list(csv_files.DictReader(handle))

    def merge(self, up_to_step: int) -> None:
        if not self.rows or not self.path.is_file():
            return
        with self.path.open(newline="", encoding="utf-8") as handle:
            new = list(csv_files.DictReader(handle))
        old = [r for r in self.rows if _int_or(r.get("step"), -1) < up_to_step]
        rows = old + new
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with atomic_path(self.path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv_files.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


def _int_or(text, default: int) -> int:
    try:
        return int(float(text))
    except (TypeError, ValueError):
        return default


@contextlib.contextmanager
def _quiet_lightning():
    """Lightning's start-up lines (GPU/TPU available, LOCAL_RANK, model summary adverts) at WARNING
    for the length of the run: scoped to Lightning's own loggers, never the root logger."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
             "lightning.pytorch.accelerators.cuda", "lightning_fabric")
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in (".*does not have many workers.*", ".*smaller than the logging interval.*",
                            ".*litlogger.*", ".*litmodels.*", ".*Checkpoint directory .* exists and is not empty.*",
                            ".*resuming from a checkpoint that ended before the epoch ended.*",
                            ".*Experiment logs directory .* exists and is not empty.*", ".*treespec.*"):
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def _slurm_plugins() -> list:
    """SLURMEnvironment(auto_requeue=True) when running under SLURM: on the requeue signal Lightning
    saves a checkpoint and requeues the job, which then resumes (see :func:`fit`)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=True)]
    return []


def _slurm_requeued() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID")) and _int_or(os.environ.get("SLURM_RESTART_COUNT"), 0) > 0


def _resume_source(output: Path, resume_path: Path) -> Optional[Path]:
    """The newest resumable state: ``last.ckpt`` or a Lightning SLURM ``hpc_ckpt_*.ckpt``."""
    candidates = [p for p in [resume_path, *output.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


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
        schedule). Settings other than :data:`RESUMABLE_CHANGES` must match the run's
        (:func:`check_resume_settings`). A finished run given a larger ``max_steps`` (or
        ``max_epochs``) continues to it; otherwise resuming it returns its stored result. A SLURM
        job requeued by Lightning's auto-requeue resumes by itself.
    callbacks : sequence of lightning callbacks
        Added to the run (monitoring, tests).

    Returns
    -------
    FitResult

    Raises
    ------
    RunInterrupted
        SIGTERM or SIGINT arrived: a resumable checkpoint and a summary marked ``interrupted``
        were written.
    """
    config.validate()
    output = Path(config.output_dir).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)
    checkpoints = output / "checkpoints"
    resume_path = checkpoints / RESUME_NAME
    requeued = _slurm_requeued()
    summary_path = output / "dapt_summary.json"
    if resume and not requeued and _resume_source(output, resume_path) is None and not summary_path.is_file():
        raise InputError(f"--resume: {output} holds no run to resume (no checkpoints/{RESUME_NAME}): leave out --resume "
                         "to start a new run there, or give the run's own --out")
    resume = resume or requeued
    if not resume and resume_path.exists():
        raise InputError(f"{output} already holds a run: pass --resume to continue it or choose another output folder")
    previous: Optional[dict] = None
    if resume:
        check_resume_settings(config, _stored_settings(output))
        if summary_path.is_file():
            previous = json.loads(summary_path.read_text(encoding="utf-8"))
    source = _resume_source(output, resume_path) if resume else None
    resumed_step = 0
    if source is not None:
        # Untrusted until read weights-only: refused in one line before any work (or log line) starts.
        resumed_step = _int_or(read_lightning_checkpoint(source).get("global_step"), 0)
    L.seed_everything(config.seed, workers=True, verbose=False)
    if train_records is None or val_records is None:
        train_records, val_records = split_records(records, val_fraction=config.val_fraction, seed=config.seed)
    train_records, val_records = list(train_records), list(val_records)
    world = _world_size(config)
    _check_records(train_records, val_records, config, world)

    _check_logger(config)
    steps_per_epoch = len(train_records) // (config.batch_size * world)
    total_steps, trainer_epochs, limited_by = plan_steps(config, steps_per_epoch)
    warmup = warmup_for(config, total_steps)
    if limited_by == "max_epochs" and config.max_steps and config.max_steps > 0:
        log.warning("--max-epochs %d ends the run at %d steps, before --max-steps %d", config.max_epochs, total_steps,
                    config.max_steps)
    if previous is not None and not previous.get("result", {}).get("interrupted"):
        done = int(previous.get("result", {}).get("global_step", 0))
        if total_steps <= done or source is None:
            log.warning("the run in %s has finished (%d steps); give a larger --max-steps to extend it", output, done)
            return FitResult(**{k: v for k, v in previous["result"].items() if k in _FIT_FIELDS})

    precision = resolve_precision(config.precision, config.accelerator)
    loaded = models.load_model(config.model, checkpoint=config.checkpoint, weights_dir=config.weights_dir, device="cpu")
    module = DaptModule(loaded, config)
    module.total_steps, module.warmup_steps = total_steps, warmup
    data = DaptDataModule(train_records, val_records, config, loaded.image_size)
    texts = [" ".join(s) for s in data.train_set.sentences]
    distinct = len(set(texts))
    if distinct < 0.9 * len(texts) and config.loss not in ("unicl", "dlilp"):
        # Pairs with the same text are each other's negatives in a contrastive batch (the label-aware
        # losses make pairs that share a label positives instead).
        log.warning("%d training pairs have only %d distinct texts (--text %s): pairs sharing a text are each other's "
                    "negatives; expect a noisy loss and consider deduplicating or --loss unicl", len(texts), distinct,
                    config.text_choice)
    # Validate at least once, at the end, even for runs shorter than the interval.
    val_every = max(1, min(config.val_every_steps, total_steps))
    patience = max(1, math.ceil(config.patience_steps / val_every))
    monitor, mode = config.monitor, MONITORS[config.monitor]
    if monitor == "val_auroc" and len({r.target for r in val_records if r.target is not None}) < 2:
        raise InputError(f"--monitor val_auroc needs validation scans with {config.val_label} labels of both classes: "
                         "use --monitor val_loss, choose another --label or label the validation patients")

    checkpoint_cb = EngineCheckpoint(dirpath=str(checkpoints), filename=f"step{{step:07d}}-{monitor}{{{monitor}:.4f}}",
                                     auto_insert_metric_name=False, monitor=monitor, mode=mode,
                                     save_top_k=config.top_k, save_last=True, ensemble_json=output / "ensemble.json",
                                     config=config)
    early_cb = HealthAwareEarlyStopping(monitor=monitor, mode=mode, patience=patience, check_on_train_epoch_end=False)
    signals = _SignalCatcher(checkpoints)
    strategy = config.strategy
    if strategy == "auto" and world > 1:
        strategy = "ddp"
    csv_file = output / "logs" / "metrics.csv"
    old_logs = _PreviousLogs(csv_file) if source is not None else None
    with _quiet_lightning():
        trainer = L.Trainer(
            default_root_dir=str(output), max_epochs=trainer_epochs, max_steps=total_steps,
            val_check_interval=val_every, check_val_every_n_epoch=None, num_sanity_val_steps=-1,
            gradient_clip_val=config.gradient_clip_norm, gradient_clip_algorithm="norm",
            accelerator=config.accelerator, devices=config.devices, num_nodes=config.num_nodes, strategy=strategy,
            precision=precision, use_distributed_sampler=False, deterministic=config.deterministic,
            callbacks=[checkpoint_cb, early_cb, _ValidateAtEnd(total_steps), _Throughput(), _FlushLogs(), signals,
                       *callbacks],
            logger=_loggers(config, output), plugins=_slurm_plugins(),
            enable_progress_bar=config.progress_bar, enable_model_summary=False, log_every_n_steps=1,
        )
        signals.install(trainer)
        stopped = None
        try:
            trainer.fit(module, datamodule=data, ckpt_path=str(source) if source is not None else None,
                        weights_only=True)
        except (SystemExit, Exception) as exc:  # Lightning's SIGTERMException, or a loader killed by the signal
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            if not isinstance(exc, SIGTERMException) and signals.signal_name is None:
                raise
            stopped = signals.signal_name or "SIGTERM"
        finally:
            signals.uninstall()
            if old_logs is not None:  # Lightning's CSV writer started the file afresh
                old_logs.merge(resumed_step + 1)  # rows up to the resumed step are the old run's

    result = FitResult(output_dir=str(output), best_checkpoint=None, best_val_loss=None,
                       last_checkpoint=str(checkpoints / "last.safetensors"),
                       resume_checkpoint=str(resume_path) if resume_path.exists() else None,
                       global_step=int(trainer.global_step), train_samples=len(train_records),
                       val_samples=len(val_records), monitor=monitor, limited_by=limited_by, interrupted=stopped)
    if not trainer.is_global_zero:
        if stopped:
            raise RunInterrupted(stopped, 128 + _signal_number(stopped), result)
        return result
    # Read back from disk rather than from the callback: with ddp_spawn training ran elsewhere.
    ensemble_path = output / "ensemble.json"
    if ensemble_path.is_file():
        ensemble = json.loads(ensemble_path.read_text(encoding="utf-8"))
        result.top_k = [{**c, "path": str((output / c["path"]).resolve())} for c in ensemble["checkpoints"]]
        result.global_step = max(result.global_step, int(ensemble.get("global_step", 0)))
        result.ensemble_json = str(ensemble_path)
    result.stopped_early = not stopped and result.global_step < total_steps
    (output / "best.safetensors").unlink(missing_ok=True)  # a resumed run's earlier best may no longer be
    if result.top_k:
        best_source = result.top_k[0]["path"]
        result.best_val_loss = result.top_k[0].get("val_loss")
        result.best_score = result.top_k[0].get("score")
        best = output / "best.safetensors"
        shutil.copyfile(best_source, best)
        if label_head_path(best_source).is_file():
            shutil.copyfile(label_head_path(best_source), label_head_path(best))
        result.best_checkpoint = str(best)
    best_step = result.top_k[0].get("step") if result.top_k else None
    result.health = health_verdict(module.health_history, config, warmup_steps=warmup, best_step=best_step)
    result.health["best_healthy"] = bool(result.top_k and result.top_k[0].get("healthy", True))
    if module._relaxes:
        c = module.relax_counts
        result.relaxation = {"threshold": config.relax_threshold, "pairs_active": c["pairs_active"], "pairs": c["pairs"],
                             "pair_fraction": c["pairs_active"] / c["pairs"] if c["pairs"] else None,
                             "steps_active": c["steps_active"], "steps": c["steps"],
                             "step_fraction": c["steps_active"] / c["steps"] if c["steps"] else None}
    if result.health.get("warning"):
        log.warning("%s", result.health["warning"])
    for note in result.health.get("notes") or []:
        log.warning("%s", note)
    result.summary_json = str(summary_path)
    _write_json(summary_path, {"config": config.to_json(), "result": dataclasses.asdict(result),
                               "precision": precision, "world_size": world,
                               "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                               "limited_by": limited_by, "val_every_steps": val_every, "warmup_steps": warmup,
                               "train_distinct_texts": distinct,
                               "patience_validations": patience, "health_history": module.health_history})
    _plot_curves(csv_file, output / "curves.png")
    if stopped:
        raise RunInterrupted(stopped, 128 + _signal_number(stopped), result)
    return result


_FIT_FIELDS = {f.name for f in dataclasses.fields(FitResult)}


def _signal_number(name: str) -> int:
    import signal

    return int(getattr(signal, name, signal.SIGTERM))


def _step_of(path: str) -> Optional[int]:
    name = Path(path).name
    if name.startswith("step"):
        digits = name[4:].split("-")[0]
        if digits.isdigit():
            return int(digits)
    return None


def write_ensemble(path: Union[str, Path], top_k: Sequence[dict], config: DaptConfig, *, global_step: int = 0) -> Path:
    """The JSON the engine averages over: ``{"checkpoints": [{"path", "val_loss", "step"}, ...]}``, best first.

    Paths are stored relative to the JSON file's folder (``ZeroShotILDLib.ensemble`` resolves them
    against it; absolute paths from older runs are still read).

    ``combine`` names CheXzero's rule: average the probabilities of the checkpoints.
    """
    path = Path(path)
    # Relative to the file's folder: a copied or moved run folder keeps working.
    members = [{**c, "path": os.path.relpath(Path(c["path"]).resolve(), path.resolve().parent)} for c in top_k]
    payload = {"format": "zeroshot-ild-ensemble/1", "base_model": config.model, "loss": config.loss,
               "monitor": config.monitor, "combine": "mean_probability", "global_step": int(global_step),
               "checkpoints": members}
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
    """Fit once per learning rate (same split, seed and everything else) and pick the best by ``config.monitor``.

    Runs that collapsed or stayed at chance (:func:`health_verdict`) are ranked after every
    healthy one; when all are, the sweep says so (``warning`` in ``sweep.json``).

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
        # --resume continues the rates that started; the others start now.
        started = (run_dir / "dapt_summary.json").is_file() or _resume_source(run_dir, run_dir / "checkpoints" / RESUME_NAME)
        runs[rate] = fit(run_config, (), train_records=train, val_records=val, resume=resume and bool(started),
                         callbacks=callbacks)
    sign = 1.0 if MONITORS[config.monitor] == "min" else -1.0

    def unhealthy(r: FitResult) -> bool:
        return bool(r.health.get("collapsed") or r.health.get("at_chance"))

    # Healthy runs first: a collapsed or at-chance run wins only when every run is one.
    scored = [(unhealthy(r), sign * r.best_score, rate) for rate, r in runs.items() if r.best_score is not None]
    best_rate = min(scored)[2] if scored else None
    warning = None
    if scored and all(s[0] for s in scored):
        warning = "every learning rate of the sweep collapsed or stayed at chance: none of them is learning"
        log.warning("%s", warning)
    rows = [{"learning_rate": rate, "monitor": config.monitor, "best_score": r.best_score,
             "best_val_loss": r.best_val_loss, "collapsed": r.health.get("collapsed"),
             "at_chance": r.health.get("at_chance"), "global_step": r.global_step,
             "stopped_early": r.stopped_early, "best_checkpoint": r.best_checkpoint} for rate, r in runs.items()]
    summary_json = _write_json(output / "sweep.json", {"best_learning_rate": best_rate, "monitor": config.monitor,
                                                        "warning": warning, "runs": rows, "config": config.to_json()})
    summary_csv = output / "sweep.csv"
    with atomic_path(summary_csv) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv_files.DictWriter(handle, fieldnames=list(rows[0]))
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
