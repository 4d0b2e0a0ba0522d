"""The Lightning module of DAPT: losses over the global batch, validation health, optimizer and export."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ZeroShotILDLib import models

from . import losses
from .dapt_config import DaptConfig
from .dapt_health import checkpoint_verdict, embedding_health, validation_verdict
from .dapt_schedule import lr_factor
from .distributed import all_gather_no_grad, all_gather_with_grad
from .label_head import LabelHead, label_head_path, save_label_head
from .lightning_required import L
from .run_json import jsonable


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
        path = models.save_checkpoint(path, self.clip, self.spec, extra={"training": jsonable(training)})
        if self.label_head is not None:
            save_label_head(label_head_path(path), self.label_head)
        return path


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
