"""The stages of :func:`zeroshot_ild_train.dapt.fit`, in the order it calls them.

``open_run_folder`` (refuse a resume with nothing to resume, or a new run over an old one) ->
``split_pairs`` (refuse data that cannot train) -> ``plan_run`` (steps, warm-up, validation
interval) -> ``finished_result`` (a finished run is returned, not repeated) -> ``build_module``
-> ``build_data`` -> ``refuse_unscorable_monitor`` -> ``build_callbacks`` -> ``build_trainer``
-> ``run_training`` -> ``collect_result`` -> ``finish_run`` (rank 0: best, health, summary).
Every refusal comes before any training step, in the order fit always had: it decides which of
several problems a user is told about first.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ZeroShotILDLib import models
from ZeroShotILDLib.errors import InputError

from .dapt_checkpoints import (
    RESUME_NAME, EngineCheckpoint, HealthAwareEarlyStopping, _ValidateAtEnd, read_lightning_checkpoint,
)
from .dapt_config import MONITORS, DaptConfig, warmup_for
from .dapt_data import DaptDataModule, _check_records, _world_size, split_records
from .dapt_health import health_verdict
from .dapt_logs import _check_logger, _FlushLogs, _loggers, _plot_curves, _PreviousLogs, _Throughput
from .dapt_module import DaptModule
from .dapt_resume import (
    _int_or, _resume_source, _SignalCatcher, _slurm_plugins, _slurm_requeued, _stored_settings, check_resume_settings,
)
from .dapt_schedule import plan_steps
from .data import PairRecord
from .label_head import label_head_path
from .lightning_required import L
from .run_json import write_json

log = logging.getLogger(__name__)


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


_FIT_FIELDS = {f.name for f in dataclasses.fields(FitResult)}


@dataclass
class RunFolder:
    """The run's output folder and what an earlier run there left: the resume decision, made once."""

    output: Path
    #: True for ``resume=True`` and for a SLURM job that Lightning requeued.
    resume: bool
    #: ``dapt_summary.json`` of the run being resumed, when it got that far.
    previous_summary: Optional[dict]
    #: The Lightning state resumed from (``last.ckpt`` or ``hpc_ckpt_*.ckpt``); None for a new run.
    source: Optional[Path]
    #: Optimizer steps completed in ``source`` (0 for a new run).
    resumed_steps: int

    @property
    def checkpoints(self) -> Path:
        return self.output / "checkpoints"

    @property
    def resume_path(self) -> Path:
        return self.checkpoints / RESUME_NAME

    @property
    def summary_path(self) -> Path:
        return self.output / "dapt_summary.json"

    @property
    def metrics_csv(self) -> Path:
        return self.output / "logs" / "metrics.csv"


@dataclass
class RunPlan:
    """How long the run lasts and how often it validates, all counted in optimizer steps unless named."""

    world_size: int
    steps_per_epoch: int
    total_steps: int
    #: Lightning's ``max_epochs`` (-1: no epoch limit).
    trainer_epochs: int
    #: Which limit ends the run ("max_steps", "max_epochs", "max_epochs (default …)").
    limited_by: str
    warmup_steps: int
    val_every_steps: int
    #: Early-stopping patience in validations (``patience_steps`` / ``val_every_steps``, rounded up).
    patience_validations: int


def open_run_folder(config: DaptConfig, resume: bool) -> RunFolder:
    """Create the output folder and decide whether this is a resume, refusing (one line) what cannot be.

    The Lightning state is read weights-only here, before any work or log line starts: an untrusted
    or damaged ``last.ckpt`` is refused first.
    """
    output = Path(config.output_dir).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(output=output, resume=False, previous_summary=None, source=None, resumed_steps=0)
    requeued = _slurm_requeued()
    if (resume and not requeued and _resume_source(output, folder.resume_path) is None
            and not folder.summary_path.is_file()):
        raise InputError(f"--resume: {output} holds no run to resume (no checkpoints/{RESUME_NAME}): leave out --resume "
                         "to start a new run there, or give the run's own --out")
    folder.resume = resume or requeued
    if not folder.resume and folder.resume_path.exists():
        raise InputError(f"{output} already holds a run: pass --resume to continue it or choose another output folder")
    if folder.resume:
        check_resume_settings(config, _stored_settings(output))
        if folder.summary_path.is_file():
            folder.previous_summary = json.loads(folder.summary_path.read_text(encoding="utf-8"))
        folder.source = _resume_source(output, folder.resume_path)
    if folder.source is not None:
        folder.resumed_steps = _int_or(read_lightning_checkpoint(folder.source).get("global_step"), 0)
    return folder


def split_pairs(config: DaptConfig, records: Sequence[PairRecord], train_records: Optional[Sequence[PairRecord]],
                val_records: Optional[Sequence[PairRecord]]) -> tuple:
    """(train, val, world size): the given split, else :func:`split_records`; data that cannot train is refused."""
    if train_records is None or val_records is None:
        train_records, val_records = split_records(records, val_fraction=config.val_fraction, seed=config.seed)
    train_records, val_records = list(train_records), list(val_records)
    world = _world_size(config)
    _check_records(train_records, val_records, config, world)
    return train_records, val_records, world


def plan_run(config: DaptConfig, train_pairs: int, world_size: int) -> RunPlan:
    """The run's length, warm-up, validation interval and patience; says when an epoch limit cuts ``max_steps``."""
    _check_logger(config)  # a missing logger package is refused before any model is loaded
    steps_per_epoch = train_pairs // (config.batch_size * world_size)
    total_steps, trainer_epochs, limited_by = plan_steps(config, steps_per_epoch)
    warmup_steps = warmup_for(config, total_steps)
    if limited_by == "max_epochs" and config.max_steps and config.max_steps > 0:
        log.warning("--max-epochs %d ends the run at %d steps, before --max-steps %d", config.max_epochs, total_steps,
                    config.max_steps)
    # Validate at least once, at the end, even for runs shorter than the interval.
    val_every = max(1, min(config.val_every_steps, total_steps))
    return RunPlan(world_size=world_size, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                   trainer_epochs=trainer_epochs, limited_by=limited_by, warmup_steps=warmup_steps,
                   val_every_steps=val_every, patience_validations=max(1, math.ceil(config.patience_steps / val_every)))


def finished_result(folder: RunFolder, plan: RunPlan) -> Optional[FitResult]:
    """The stored result of a finished run being resumed with no more steps to do, else None (train)."""
    previous = folder.previous_summary
    if previous is None or previous.get("result", {}).get("interrupted"):
        return None
    done = int(previous.get("result", {}).get("global_step", 0))
    if plan.total_steps <= done or folder.source is None:
        log.warning("the run in %s has finished (%d steps); give a larger --max-steps to extend it", folder.output,
                    done)
        return FitResult(**{k: v for k, v in previous["result"].items() if k in _FIT_FIELDS})
    return None


def build_module(config: DaptConfig, plan: RunPlan) -> DaptModule:
    """The base model, loaded on the CPU (Lightning moves it), wrapped for training with the run's schedule."""
    loaded = models.load_model(config.model, checkpoint=config.checkpoint, weights_dir=config.weights_dir, device="cpu")
    module = DaptModule(loaded, config)
    module.total_steps, module.warmup_steps = plan.total_steps, plan.warmup_steps
    return module


def build_data(config: DaptConfig, train: list, val: list, image_size: int) -> tuple:
    """(data module, distinct training texts); warns when many training pairs share a text."""
    data = DaptDataModule(train, val, config, image_size)
    texts = [" ".join(s) for s in data.train_set.sentences]
    distinct = len(set(texts))
    if distinct < 0.9 * len(texts) and config.loss not in ("unicl", "dlilp"):
        # Pairs with the same text are each other's negatives in a contrastive batch (the label-aware
        # losses make pairs that share a label positives instead).
        log.warning("%d training pairs have only %d distinct texts (--text %s): pairs sharing a text are each other's "
                    "negatives; expect a noisy loss and consider deduplicating or --loss unicl", len(texts), distinct,
                    config.text_choice)
    return data, distinct


def refuse_unscorable_monitor(config: DaptConfig, val: list) -> None:
    """``--monitor val_auroc`` needs validation labels of both classes, or no checkpoint could ever be ranked."""
    if config.monitor == "val_auroc" and len({r.target for r in val if r.target is not None}) < 2:
        raise InputError(f"--monitor val_auroc needs validation scans with {config.val_label} labels of both classes: "
                         "use --monitor val_loss, choose another --label or label the validation patients")


def build_callbacks(config: DaptConfig, folder: RunFolder, plan: RunPlan, extra: Sequence) -> tuple:
    """(every callback of the run, the signal catcher): checkpoints, early stopping, the final validation,
    throughput, log flushing and signals, then the caller's ``extra``."""
    monitor, mode = config.monitor, MONITORS[config.monitor]
    checkpoint_cb = EngineCheckpoint(dirpath=str(folder.checkpoints),
                                     filename=f"step{{step:07d}}-{monitor}{{{monitor}:.4f}}",
                                     auto_insert_metric_name=False, monitor=monitor, mode=mode,
                                     save_top_k=config.top_k, save_last=True,
                                     ensemble_json=folder.output / "ensemble.json", config=config)
    early_cb = HealthAwareEarlyStopping(monitor=monitor, mode=mode, patience=plan.patience_validations,
                                        check_on_train_epoch_end=False)
    signals = _SignalCatcher(folder.checkpoints)
    return [checkpoint_cb, early_cb, _ValidateAtEnd(plan.total_steps), _Throughput(), _FlushLogs(), signals,
            *extra], signals


def build_trainer(config: DaptConfig, folder: RunFolder, plan: RunPlan, precision: str, callbacks: list) -> "L.Trainer":
    """Lightning's Trainer for the plan (call inside ``_quiet_lightning``: it announces devices on creation)."""
    strategy = config.strategy
    if strategy == "auto" and plan.world_size > 1:
        strategy = "ddp"
    # use_distributed_sampler=False: GlobalBatchSampler splits each global batch across ranks itself.
    return L.Trainer(
        default_root_dir=str(folder.output), max_epochs=plan.trainer_epochs, max_steps=plan.total_steps,
        val_check_interval=plan.val_every_steps, check_val_every_n_epoch=None, num_sanity_val_steps=-1,
        gradient_clip_val=config.gradient_clip_norm, gradient_clip_algorithm="norm",
        accelerator=config.accelerator, devices=config.devices, num_nodes=config.num_nodes, strategy=strategy,
        precision=precision, use_distributed_sampler=False, deterministic=config.deterministic,
        callbacks=callbacks, logger=_loggers(config, folder.output), plugins=_slurm_plugins(),
        enable_progress_bar=config.progress_bar, enable_model_summary=False, log_every_n_steps=1,
    )


def run_training(trainer: "L.Trainer", module: DaptModule, data: DaptDataModule, signals: _SignalCatcher,
                 folder: RunFolder, previous_logs: Optional[_PreviousLogs]) -> Optional[str]:
    """Train (from ``folder.source`` when resuming); returns the name of the signal that stopped it, or None."""
    signals.install(trainer)
    stopped = None
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(folder.source) if folder.source is not None else None,
                    weights_only=True)
    except (SystemExit, Exception) as exc:  # Lightning's SIGTERMException, or a loader killed by the signal
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exc, SIGTERMException) and signals.signal_name is None:
            raise
        stopped = signals.signal_name or "SIGTERM"
    finally:
        signals.uninstall()
        if previous_logs is not None:  # Lightning's CSV writer started the file afresh
            previous_logs.merge(folder.resumed_steps + 1)  # rows up to the resumed step are the old run's
    return stopped


def collect_result(trainer: "L.Trainer", config: DaptConfig, folder: RunFolder, plan: RunPlan, train: list,
                   val: list, stopped: Optional[str]) -> FitResult:
    """What every rank knows after training; rank 0 completes it with :func:`finish_run`."""
    return FitResult(output_dir=str(folder.output), best_checkpoint=None, best_val_loss=None,
                     last_checkpoint=str(folder.checkpoints / "last.safetensors"),
                     resume_checkpoint=str(folder.resume_path) if folder.resume_path.exists() else None,
                     global_step=int(trainer.global_step), train_samples=len(train), val_samples=len(val),
                     monitor=config.monitor, limited_by=plan.limited_by, interrupted=stopped)


def finish_run(result: FitResult, module: DaptModule, config: DaptConfig, folder: RunFolder, plan: RunPlan,
               precision: str, distinct_texts: int) -> None:
    """Rank 0: top-k and best from disk, the health verdict and its warnings, the summary and the curves."""
    _read_ensemble(result, folder.output)
    result.stopped_early = not result.interrupted and result.global_step < plan.total_steps
    _copy_best(result, folder.output)
    best_step = result.top_k[0].get("step") if result.top_k else None
    result.health = health_verdict(module.health_history, config, warmup_steps=plan.warmup_steps, best_step=best_step)
    result.health["best_healthy"] = bool(result.top_k and result.top_k[0].get("healthy", True))
    result.relaxation = _relaxation(module, config)
    if result.health.get("warning"):
        log.warning("%s", result.health["warning"])
    for note in result.health.get("notes") or []:
        log.warning("%s", note)
    result.summary_json = str(folder.summary_path)
    write_json(folder.summary_path, {"config": config.to_json(), "result": dataclasses.asdict(result),
                                     "precision": precision, "world_size": plan.world_size,
                                     "steps_per_epoch": plan.steps_per_epoch, "total_steps": plan.total_steps,
                                     "limited_by": plan.limited_by, "val_every_steps": plan.val_every_steps,
                                     "warmup_steps": plan.warmup_steps, "train_distinct_texts": distinct_texts,
                                     "patience_validations": plan.patience_validations,
                                     "health_history": module.health_history})
    _plot_curves(folder.metrics_csv, folder.output / "curves.png")


def _read_ensemble(result: FitResult, output: Path) -> None:
    # Read back from disk rather than from the callback: with ddp_spawn training ran elsewhere.
    ensemble_path = output / "ensemble.json"
    if ensemble_path.is_file():
        ensemble = json.loads(ensemble_path.read_text(encoding="utf-8"))
        result.top_k = [{**c, "path": str((output / c["path"]).resolve())} for c in ensemble["checkpoints"]]
        result.global_step = max(result.global_step, int(ensemble.get("global_step", 0)))
        result.ensemble_json = str(ensemble_path)


def _copy_best(result: FitResult, output: Path) -> None:
    """``best.safetensors`` (and its label head): a copy of the first top-k checkpoint, healthy ones ranked first."""
    best = output / "best.safetensors"
    best.unlink(missing_ok=True)  # a resumed run's earlier best may no longer be
    if not result.top_k:
        return
    best_source = result.top_k[0]["path"]
    result.best_val_loss = result.top_k[0].get("val_loss")
    result.best_score = result.top_k[0].get("score")
    shutil.copyfile(best_source, best)
    if label_head_path(best_source).is_file():
        shutil.copyfile(label_head_path(best_source), label_head_path(best))
    result.best_checkpoint = str(best)


def _relaxation(module: DaptModule, config: DaptConfig) -> Optional[dict]:
    """How often eq. 3 changed a positive pair (relaxed losses only), over every training step."""
    if not module._relaxes:
        return None
    c = module.relax_counts
    return {"threshold": config.relax_threshold, "pairs_active": c["pairs_active"], "pairs": c["pairs"],
            "pair_fraction": c["pairs_active"] / c["pairs"] if c["pairs"] else None,
            "steps_active": c["steps_active"], "steps": c["steps"],
            "step_fraction": c["steps_active"] / c["steps"] if c["steps"] else None}


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
