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

The stages of :func:`fit` are in ``dapt_fit``; the Lightning module in ``dapt_module``, its data in
``dapt_data``, checkpoints in ``dapt_checkpoints``, health verdicts in ``dapt_health``, logging in
``dapt_logs``, signals and resuming in ``dapt_resume``, the schedule in ``dapt_schedule``, DLILP's
head in ``label_head``. Every name they define is importable from here too.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ZeroShotILDLib import models
from ZeroShotILDLib import csv_files
from ZeroShotILDLib.errors import InputError

# Lightning first: without it every import below would fail with a traceback instead of the pip line.
from .lightning_required import L
from .data import PairRecord
from .files import atomic_path
# Every name below was defined here before the module was split by stage; callers and tests import
# them from ``dapt`` (the CLI, covid and demo_model through ``dapt.<name>``), so they stay importable.
# The settings and the names they take live in a torch-free module (the CLI's --help reads them).
from .dapt_config import (  # noqa: F401
    CHANCE_MARGIN, COLLAPSE_COSINE, COLLAPSE_SPREAD_RATIO, DEFAULT_MAX_EPOCHS, DEFAULT_RECIPE, LOGGERS, LOGIT_SCALE_MAX,
    LOSS_VIEWS, LOSSES, MONITORS, OPTIMIZERS, RECIPES, DaptConfig, default_workers, recipe_config, warmup_for,
)
from .dapt_checkpoints import (  # noqa: F401
    RESUME_NAME, EngineCheckpoint, HealthAwareEarlyStopping, _step_of, _ValidateAtEnd, read_lightning_checkpoint,
    write_ensemble,
)
from .dapt_data import DaptDataModule, _check_records, _world_size, split_records  # noqa: F401
from .dapt_fit import (  # noqa: F401
    _FIT_FIELDS, FitResult, RunFolder, RunPlan, build_callbacks, build_data, build_module, build_trainer,
    collect_result, finish_run, finished_result, open_run_folder, plan_run, refuse_unscorable_monitor,
    resolve_precision, run_training, split_pairs,
)
from .dapt_health import (  # noqa: F401
    checkpoint_verdict, embedding_health, health_verdict, validation_verdict, validation_verdicts,
)
from .dapt_logs import (  # noqa: F401
    _check_logger, _FlushLogs, _loggers, _plot_curves, _PreviousLogs, _quiet_lightning, _StepCSVLogger, _Throughput,
)
from .dapt_module import DaptModule, validation_prompts  # noqa: F401
from .dapt_resume import (  # noqa: F401
    RESUMABLE_CHANGES, RunInterrupted, _int_or, _resume_source, _short, _signal_number, _SignalCatcher,
    _slurm_plugins, _slurm_requeued, _stored_settings, check_resume_settings,
)
from .dapt_schedule import lr_factor, plan_steps  # noqa: F401
from .label_head import (  # noqa: F401
    _LABEL_HEAD_KEY, LABEL_HEAD_SUFFIX, LabelHead, label_head_path, load_label_head, save_label_head,
)
from .run_json import jsonable as _jsonable, write_json as _write_json  # noqa: F401

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """Outcome of :func:`sweep`: one FitResult per learning rate and the best of them."""

    best_learning_rate: Optional[float]
    best: Optional[FitResult]
    runs: dict
    summary_json: str
    summary_csv: str


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
    folder = open_run_folder(config, resume)
    L.seed_everything(config.seed, workers=True, verbose=False)
    train, val, world_size = split_pairs(config, records, train_records, val_records)
    plan = plan_run(config, len(train), world_size)
    stored = finished_result(folder, plan)
    if stored is not None:
        return stored
    precision = resolve_precision(config.precision, config.accelerator)
    module = build_module(config, plan)
    data, distinct_texts = build_data(config, train, val, module.image_size)
    refuse_unscorable_monitor(config, val)
    run_callbacks, signals = build_callbacks(config, folder, plan, callbacks)
    # Read before Lightning's CSV writer starts metrics.csv afresh; merged back after training.
    previous_logs = _PreviousLogs(folder.metrics_csv) if folder.source is not None else None
    with _quiet_lightning():
        trainer = build_trainer(config, folder, plan, precision, run_callbacks)
        stopped = run_training(trainer, module, data, signals, folder, previous_logs)
    result = collect_result(trainer, config, folder, plan, train, val, stopped)
    if trainer.is_global_zero:
        finish_run(result, module, config, folder, plan, precision, distinct_texts)
    if stopped:
        raise RunInterrupted(stopped, 128 + _signal_number(stopped), result)
    return result


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
        # ``fit`` is looked up here at call time: callers and tests that replace ``dapt.fit`` reach the sweep too.
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
