"""zeroshot-ild-train: split, preprocess, train (DAPT), evaluate and study ZeroShotILD models on a cohort.

    zeroshot-ild-train split        MANIFEST --out SPLIT.csv          patient-level train/val/test
    zeroshot-ild-train preprocess   MANIFEST --cache DIR              cached montages (--shard i/N)
    zeroshot-ild-train train        MANIFEST --cache DIR --out RUN    DAPT (any loss, DDP, --resume)
    zeroshot-ild-train sweep        MANIFEST --cache DIR --out DIR    learning-rate sweep
    zeroshot-ild-train export       RUN/checkpoints/last.ckpt --out MODEL.safetensors
    zeroshot-ild-train evaluate     MANIFEST --out DIR --model M ...  AUROC/AUPRC/F1 with 95 % CIs
    zeroshot-ild-train grid         MANIFEST --out DIR ...            the tables of Van Uden et al. 2023
    zeroshot-ild-train reader-study export|analyze ...                numbered montages, ICC(3,1)
    zeroshot-ild-train probe        MANIFEST --cache DIR --out DIR    K-shot linear probing
    zeroshot-ild-train alignment    MANIFEST --cache DIR --out DIR    image-text alignment
    zeroshot-ild-train preview-text MANIFEST --text lung -n 3         what --text picks (stdout only)

Every command is a thin adapter: montages, models and scores come from the engine
(``ZeroShotILDLib``), training from ``zeroshot_ild_train.dapt``, metrics and tables from
``zeroshot_ild_train.metrics`` / ``zeroshot_ild_train.plots``. Bad input ends with one line on stderr and exit
code 2; a command that finished but could not use some scans exits 3 (the same codes as
``zeroshot-ild``); result folders are written to a temporary folder and moved into place at the
end, so an interrupted command leaves no half-written results.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ZeroShotILDLib.cli import (EXIT_CANCELLED, EXIT_INPUT, EXIT_PARTIAL, TqdmProgress, _add_settings_args, log_level,
                                quiet_itk, settings_from_args)
from ZeroShotILDLib import csv_files
from ZeroShotILDLib.errors import Cancelled, InputError
from ZeroShotILDLib.settings import AnalysisSettings, OneLineArgumentParser

from .files import atomic_path, atomic_write_text, check_export_target, claim_out_dir, finish_all, staged_output

PROG = "zeroshot-ild-train"
# One text default for every command that reads report text (train, sweep, preview-text, alignment).
from .dapt_config import DEFAULT_RECIPE as _DEFAULT_RECIPE, RECIPES as _RECIPES  # noqa: E402  (torch-free)

DEFAULT_TEXT = _RECIPES[_DEFAULT_RECIPE]["text_choice"]
#: Written by ``preprocess`` beside the montages: the engine settings they were built with.
CACHE_SETTINGS = "preprocess_settings.json"
#: Folder inside an evaluate/grid --out where finished per-scan scores are kept (a re-run skips those scans).
SCORE_CACHE = ".scan_scores"
log = logging.getLogger(PROG)


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
def _bar(iterable, *, total: Optional[int] = None, desc: str, quiet: bool):
    from tqdm import tqdm

    if not quiet and not sys.stderr.isatty():
        # A log file gets one line per stage, not a carriage-return bar.
        print(f"{PROG}: {desc}", file=sys.stderr, flush=True)
        quiet = True
    return tqdm(iterable, total=total, desc=desc, disable=quiet, file=sys.stderr, leave=False, dynamic_ncols=True)


def _staged_output(out: Path):
    """Staging inside ``out`` (``training.files.staged_output``): files move into ``out`` one atomic rename each."""
    return staged_output(out)


def _write_json(path: Path, payload) -> Path:
    """Strict JSON (non-finite numbers become null, with a note): bare NaN breaks every other JSON reader."""
    from ZeroShotILDLib.outputs import json_text

    return atomic_write_text(path, json_text(payload, default=_plain))


def _plain(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


def _write_rows(path: Path, rows: Sequence[dict]) -> Path:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv_files.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _csv_list(text: Optional[str], cast=str, *, what: str) -> list:
    if text is None:
        return []
    try:
        return [cast(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{what} {text!r} is not a comma-separated list of {cast.__name__} values") from None


def _read_manifest(path: str, **kwargs):
    from .manifest import read_manifest

    return read_manifest(path, **kwargs)


def _cache_settings(cache: str) -> AnalysisSettings:
    path = Path(cache).expanduser() / CACHE_SETTINGS
    if not path.is_file():
        raise InputError(f"{cache} holds no {CACHE_SETTINGS}: run `{PROG} preprocess MANIFEST --cache {cache}` first")
    return AnalysisSettings.from_dict(json.loads(path.read_text(encoding="utf-8")))


def _pairs(records, cache: str, class_names=None, label: str = "ild"):
    """PairRecords for the records whose montage is in the cache; one-line error if any is missing."""
    from . import preprocess
    from .data import pairs_from_manifest

    settings = _cache_settings(cache)
    montages = preprocess.finished_montages(records, cache, settings)
    missing = [r for r in records if r.scan_id not in montages]
    if missing:
        raise InputError(f"{len(missing)} of {len(records)} scans have no finished montage in {cache} "
                         f"(first: {missing[0].source}): run preprocess (every shard) with the same settings")
    return pairs_from_manifest(records, montages, class_names, label=label), settings


# ----------------------------------------------------------------------------------------------
# split / preprocess
# ----------------------------------------------------------------------------------------------
def _cmd_split(args) -> int:
    from .manifest import split_by_patient, write_manifest

    from .splits import split_balance, stratified_patient_split

    records = _read_manifest(args.manifest, check_files=False)
    if args.stratify:  # patients whole, images of each class balanced (AUROC is per image)
        split = stratified_patient_split(records, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                                         seed=args.seed, stratify=args.stratify)
    else:
        split = split_by_patient(records, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                                 seed=args.seed)
    out = Path(args.out).expanduser()
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise InputError(f"--out {out} is not a plain file: choose another --out")
    write_manifest(split, out)  # atomic: a temporary file of its own (O_EXCL) renamed onto --out
    for row in split_balance(split, args.stratify):
        line = f"{row['split']}: {row['images']} scans, {row['patients']} patients"
        tally = {k.split("=", 1)[1]: v for k, v in row.items() if k.startswith("images ")}
        if tally:
            line += f"; {args.stratify} " + ", ".join(f"{k}: {v}" for k, v in tally.items())
        if "positive images %" in row:
            line += f" ({row['positive images %']:.1f} % of scans, {row['positive patients %']:.1f} % of patients positive)"
        print(line)
    print(f"written {out}")
    return 0


def _cmd_preprocess(args, progress) -> int:
    from . import preprocess

    settings = settings_from_args(args)
    shard = preprocess.parse_shard(args.shard)
    if args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    # The pixel size of 2-D rows comes from the manifest only: train/probe find the montages by it.
    records, _ = _with_pixel_spacing(_read_manifest(args.manifest), None)
    from ZeroShotILDLib.atomic_files import check_cache_folder

    cache = check_cache_folder(args.cache, option="--cache")  # a file or read-only: one line, before any work
    stored = cache / CACHE_SETTINGS
    if stored.is_file():
        previous = AnalysisSettings.from_dict(json.loads(stored.read_text(encoding="utf-8")))
        if preprocess.settings_key(previous) != preprocess.settings_key(settings):
            raise InputError(f"{cache} was preprocessed with other montage settings: use a new --cache folder per setting")
    else:  # shards of one job array may race here; they write the same content atomically
        atomic_write_text(stored, settings.to_json())
    summary = preprocess.preprocess(records, cache, settings, workers=args.workers, shard=shard, progress=progress)
    progress.close()
    print(f"shard {shard[0]}/{shard[1]}: {summary.line()} -> {cache}")
    from . import cohort_qc

    # The whole cohort as far as it is cached (every shard rewrites it; the last one's is complete).
    qc = cohort_qc.cohort_qc(records, preprocess.finished_montages(records, cache, settings),
                             grid_n=settings.montage_size, failed=[scan_id for scan_id, _ in summary.failed])
    cohort_qc.write_qc(qc, cache / cohort_qc.QC_NAME)
    print(f"{cohort_qc.qc_line(qc)} -> {cache / cohort_qc.QC_NAME}")
    for scan_id, reason in summary.failed:
        print(f"  failed {scan_id}: {reason}", file=sys.stderr)
    return EXIT_PARTIAL if summary.failed else 0


# ----------------------------------------------------------------------------------------------
# train / sweep / export
# ----------------------------------------------------------------------------------------------
def _add_training_args(p: argparse.ArgumentParser) -> None:
    from . import dapt_config as dapt  # torch-free: --help must not import torch and Lightning
    from . import reports

    d = dapt.DaptConfig(output_dir="")
    p.add_argument("manifest", help="CSV/JSONL manifest (see README: scan_path, report_text|report_path, labels, split, patient_id)")
    p.add_argument("--cache", required=True, help="folder written by `preprocess` (the montages to train on)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, logs, summary")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, help=f"registry name, dapt:<checkpoint> or a checkpoint path (default {d.model})")
    g.add_argument("--checkpoint", help="weights file for a registry model")
    g.add_argument("--weights-dir", help="folder where registry weights are looked for")
    g = p.add_argument_group("loss and text")
    g.add_argument("--loss", default=d.loss, choices=dapt.LOSSES,
                   help="clip | relaxed (relaxed positives, Jang et al. 2022, eq. 3) | slip | uniclip | unicl, dlilp "
                        "(need labels)")
    g.add_argument("--relaxed-positives", action="store_true", help="also relax the positives of slip/uniclip (Jang et al.'s 'w/ ours')")
    g.add_argument("--relax-threshold", type=float, default=d.relax_threshold, help="t of eq. 3 (0.5)")
    g.add_argument("--relax-slope", type=float, default=d.relax_slope, help="alpha of eq. 3 (10)")
    g.add_argument("--dlilp-text-weight", type=float, default=d.dlilp_text_weight, help="lambda of DLILP (0.1)")
    g.add_argument("--classes", help="comma-separated label classes for unicl/dlilp (default: ild, no ild, subtypes, label_* columns)")
    g.add_argument("--recipe", default=dapt.DEFAULT_RECIPE, choices=tuple(dapt.RECIPES),
                   help="paper000 (default, Van Uden et al. 2023): impression, whole text; paper001 (Jang et al. 2022): "
                        "findings+impression, 3 sampled sentences")
    g.add_argument("--text", dest="text_choice", default=None, choices=reports.TEXT_CHOICES,
                   help="report part to train on (default: the recipe's; full = whole text, e.g. captions)")
    g.add_argument("--sentences", type=int, default=None,
                   help="sentences sampled per report and step (default: the recipe's; 0 = whole text)")
    g.add_argument("--no-augment", action="store_true", help="no weak (geometric) augmentation of the CLIP/UniCL/DLILP image")
    g.add_argument("--intensity-augment", action="store_true",
                   help="add brightness/contrast 0.5-2 to augmented views (changes HU-window density; off by default)")
    g = p.add_argument_group("optimisation (defaults: Van Uden et al. 2023 / Jang et al. 2022)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per device and step")
    g.add_argument("--lr", type=float, default=d.learning_rate, help="peak learning rate")
    g.add_argument("--optimizer", default=d.optimizer, choices=dapt.OPTIMIZERS)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help="linear warm-up steps (default: 10%% of the run's steps, at most 100; longer than the run is refused)")
    g.add_argument("--max-epochs", type=int, default=None,
                   help=f"epoch limit (default: none with --max-steps, else {dapt.DEFAULT_MAX_EPOCHS}); the earlier limit wins")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer-step limit (-1 = none)")
    g.add_argument("--grad-clip", type=float, default=d.gradient_clip_norm, help="max gradient norm (0 = off)")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction, help="patients held out when the manifest has no split")
    g.add_argument("--val-every", type=int, default=d.val_every_steps, help="validate and checkpoint every N steps")
    g.add_argument("--patience", type=int, default=d.patience_steps, help="early-stopping patience in steps")
    g.add_argument("--top-k", type=int, default=d.top_k, help="checkpoints kept (and ensembled) by the monitor")
    g.add_argument("--monitor", default=d.monitor, choices=tuple(dapt.MONITORS),
                   help="checkpoint, early-stopping and sweep criterion: val_loss (Van Uden et al. 2023) or val_auroc "
                   "(zero-shot AUROC on the validation labels)")
    g.add_argument("--label", default=d.val_label,
                   help="yes/no label of the validation AUROC (val_auroc): ild or any label_<name> column, e.g. covid")
    g.add_argument("--prompt", default=None,
                   help="text scored for that AUROC (default: the label's name, or for ild the preprocessing prompt)")
    g.add_argument("--negative", default=None, help="its negative text (default: 'no ' + the prompt)")
    g.add_argument("--logger", default=d.logger, choices=dapt.LOGGERS,
                   help="metrics.csv is always written; tensorboard / mlflow add their logs (if installed)")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("hardware")
    g.add_argument("--accelerator", default=d.accelerator, help="auto | cpu | gpu")
    g.add_argument("--devices", default="1", help="devices per node: a count, 'auto', or ids '0,1'")
    g.add_argument("--num-nodes", type=int, default=d.num_nodes, help="nodes (multi-node DDP; launch with srun/torchrun)")
    g.add_argument("--strategy", default=d.strategy, help="auto (DDP when several processes) | ddp | ddp_spawn ...")
    g.add_argument("--precision", default=d.precision, help="auto (bf16-mixed on GPU, 32-true on CPU) | 32-true | 16-mixed ...")
    g.add_argument("--workers", type=int, default=d.num_workers,
                   help="data-loader processes per device (default: the CPUs this process may use minus one, at most 4)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")


def _devices(text: str):
    text = str(text).strip()
    if text == "auto" or "," in text:
        return text
    try:
        return int(text)
    except ValueError:
        raise InputError(f"--devices {text!r}: give a count, 'auto' or a list of ids such as 0,1") from None


def _apply_recipe(args) -> None:
    """Fill --text / --sentences left unset from --recipe (train and sweep)."""
    from . import dapt_config as dapt

    if getattr(args, "recipe", None) is None:
        return
    recipe = dapt.recipe_config(args.recipe)
    if args.text_choice is None:
        args.text_choice = recipe["text_choice"]
    if args.sentences is None:
        args.sentences = recipe["sentences_per_sample"]


def _config_from_args(args, out: str, class_names: tuple, montage_settings: AnalysisSettings):
    from . import dapt

    _apply_recipe(args)
    return dapt.DaptConfig(recipe=args.recipe, intensity_augment=args.intensity_augment, monitor=args.monitor,
                           logger=args.logger,
        output_dir=out, model=args.model, checkpoint=args.checkpoint, weights_dir=args.weights_dir, loss=args.loss,
        relaxed_positives=args.relaxed_positives, relax_threshold=args.relax_threshold, relax_slope=args.relax_slope,
        dlilp_text_weight=args.dlilp_text_weight, class_names=class_names, text_choice=args.text_choice,
        sentences_per_sample=args.sentences, augment=not args.no_augment, batch_size=args.batch_size,
        learning_rate=args.lr, optimizer=args.optimizer, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, max_epochs=args.max_epochs, max_steps=args.max_steps,
        gradient_clip_norm=args.grad_clip or None, val_fraction=args.val_fraction, val_every_steps=args.val_every,
        patience_steps=args.patience, top_k=args.top_k, accelerator=args.accelerator, devices=_devices(args.devices),
        num_nodes=args.num_nodes, strategy=args.strategy, precision=args.precision, num_workers=args.workers,
        seed=args.seed, progress_bar=not args.quiet and sys.stderr.isatty(), montage_settings=montage_settings.to_dict(),
        val_label=args.label, val_prompt=args.prompt, val_negative=args.negative,
    )


def _training_inputs(args):
    from .data import default_class_names

    from .manifest import check_label, label_value

    needs_labels = args.loss in ("unicl", "dlilp")
    records = _read_manifest(args.manifest)
    label = args.label.strip().lower()
    if label == "subtype":
        raise InputError("--label subtype is not a yes/no label: use ild or a label_<name> column")
    # The validation AUROC's label must exist (a typo is one line); blank everywhere is allowed
    # for ild only (the default), where the AUROC is then simply not reported.
    label = check_label(records, label) if (label != "ild" or any(r.ild is not None for r in records)) else label
    args.label = label
    if not needs_labels:  # image-only rows (e.g. negatives without text) are for evaluation, not for text losses
        def kept(r):
            # Labelled validation images without text stay: they feed the zero-shot AUROC (dapt).
            return (r.report_text is not None or r.report_path is not None
                    or (r.split == "val" and (label_value(r, label) is not None or (label == "ild" and r.subtype))))

        texted = [r for r in records if r.report_text is not None or r.report_path is not None]
        if not texted:
            raise InputError(f"no row of {args.manifest} has report_text or report_path: loss {args.loss} trains on text")
        used = [r for r in records if kept(r)]
        if len(used) < len(records):
            log.warning("%d of %d rows have no report and are left out of training", len(records) - len(used), len(records))
        records = used
    classes = tuple(_csv_list(args.classes, what="--classes")) if args.classes else ()
    if needs_labels and not classes:
        classes = default_class_names(records)
    pairs, settings = _pairs(records, args.cache, classes or None, label=label)
    return pairs, classes, settings


def _print_fit(result, label: str = "") -> None:
    head = f"{label}: " if label else ""
    if result.best_checkpoint:
        score = f"best {result.monitor} {result.best_score:.4f}" if result.best_score is not None else "best checkpoint"
        if result.monitor != "val_loss" and result.best_val_loss is not None:
            score += f" (val loss {result.best_val_loss:.4f})"
        unhealthy = (result.health or {}).get("best_healthy") is False
        print(f"{head}{score} after {result.global_step} steps"
              f"{' (stopped early)' if result.stopped_early else ''}: {result.best_checkpoint}"
              f"{'  (NOT HEALTHY: no validation of this run was)' if unhealthy else ''}")
    else:
        print(f"{head}{result.global_step} steps, no checkpoint scored")
    if result.limited_by:
        print(f"{head}length set by {result.limited_by.replace('_', '-')}")
    last = (result.health or {}).get("last") or {}
    if last:
        parts = [f"{k[4:]} {v:.3f}" for k, v in last.items() if k.startswith("val_") and k not in ("val_loss", "val_pairs")]
        print(f"{head}last validation: " + ", ".join(parts))
    if result.relaxation and result.relaxation.get("pair_fraction") is not None:
        r = result.relaxation
        print(f"{head}relaxation active for {r['pair_fraction']:.1%} of positive pairs "
              f"({r['step_fraction']:.1%} of steps)")
    if result.ensemble_json:
        print(f"{head}top-{len(result.top_k)} ensemble: {result.ensemble_json}")
    # A collapsed / at-chance verdict was already logged by dapt.fit as one warning line.


def _cmd_train(args) -> int:
    from . import dapt

    claim_out_dir(args.out, "train")  # a foreign --out is refused before any work
    pairs, classes, settings = _training_inputs(args)
    config = _config_from_args(args, args.out, classes, settings)
    try:
        result = dapt.fit(config, pairs, resume=args.resume)
    except dapt.RunInterrupted as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
    if result.summary_json:  # rank 0 only
        _print_fit(result)
    if result.best_score is not None:
        args._headline = f"best {result.monitor} {result.best_score:.4f} at step {result.top_k[0].get('step')}"
    return 0


def _cmd_sweep(args) -> int:
    from . import dapt

    claim_out_dir(args.out, "sweep")
    pairs, classes, settings = _training_inputs(args)
    config = _config_from_args(args, args.out, classes, settings)
    rates = _csv_list(args.lrs, float, what="--lrs") or dapt.default_learning_rates()
    try:
        result = dapt.sweep(config, pairs, learning_rates=rates, resume=args.resume)
    except dapt.RunInterrupted as exc:
        print(f"{PROG}: {exc} (the sweep continues with --resume)", file=sys.stderr)
        return exc.exit_code
    for rate, run in result.runs.items():
        _print_fit(run, f"lr {rate:.2e}")
    if result.best_learning_rate is not None:
        print(f"best learning rate {result.best_learning_rate:.2e}: {result.best.best_checkpoint}")
    print(f"summary: {result.summary_csv}")
    return 0


def _cmd_export(args) -> int:
    from . import dapt

    source = Path(args.checkpoint).expanduser()
    check_export_target(args.out)  # only a new file or an engine checkpoint of ours is replaced
    if not source.is_file():
        raise InputError(f"{source} does not exist: give a run's checkpoints/last.ckpt")
    if source.suffix != ".ckpt":
        raise InputError(f"{source.name} is not a Lightning .ckpt: top-k .safetensors files are already engine checkpoints")
    classes = tuple(_csv_list(args.classes, what="--classes")) if args.classes else None
    out = dapt.export(source, Path(args.out).expanduser(), model=args.model, checkpoint=args.base_checkpoint,
                      weights_dir=args.weights_dir, loss=args.loss, class_names=classes)
    print(f"engine checkpoint: {out}  (use --model dapt:{out})")
    return 0


# ----------------------------------------------------------------------------------------------
# Scoring scans with the engine (evaluate, grid)
# ----------------------------------------------------------------------------------------------
def _ensemble_members(path: str) -> list:
    from ZeroShotILDLib.ensemble import read_ensemble

    return read_ensemble(path)


class _Scorer:
    """Finding and subtype probabilities of scans for several model/settings variants.

    Each scan is read and its lungs segmented once; every variant then runs the engine's
    ``Analyzer`` on that mask. Variants that differ only in retrieval or montage size share one
    analysis and are re-scored with ``Analyzer.reprompt`` (no patch is encoded twice). 2-D images
    are read as one-slice scans (``preprocess.read_any_scan``), taken whole when no lungs are found.

    A scan that cannot be scored (no lungs, unreadable) is listed in ``failures`` and the others go
    on. With ``cache_dir`` each finished (scan, variant) score is kept there, keyed by the scan's
    content, its pixel size, the settings and the model files, so a re-run skips finished scans.
    """

    def __init__(self, base: AnalysisSettings, cache_dir: Optional[Path] = None):
        self.base = base
        self.cache_dir = cache_dir
        self._analyzers: dict = {}

    def _analyzer(self, model: str, filter_threshold: float):
        from ZeroShotILDLib.pipeline import Analyzer

        key = (model, filter_threshold)
        if key not in self._analyzers:
            settings = dataclasses.replace(self.base, model=model, filter_threshold=filter_threshold,
                                           checkpoint=self.base.checkpoint if model == self.base.model else None)
            self._analyzers[key] = Analyzer(settings)
        return self._analyzers[key]

    def _scan_and_mask(self, record):
        from ZeroShotILDLib import lung_mask

        from .preprocess import is_image, read_any_scan

        scan = read_any_scan(record.scan_path, self.base, record.pixel_spacing_mm)
        try:
            mask = lung_mask.segment_lungs(scan.hu, scan.spacing_mm, self.base.lung)
        except InputError:
            if not is_image(record.scan_path):
                raise
            mask = np.ones(scan.hu.shape, dtype=bool)  # a figure crop: the whole image, as preprocess takes it
        return scan, mask

    def _key(self, record, variant: dict, model_hashes: dict) -> str:
        import hashlib

        from ZeroShotILDLib.file_hashes import sha256_path

        settings = {k: v for k, v in self.base.to_dict().items() if k not in ("device", "batch_size", "model",
                                                                               "checkpoint", "weights_dir")}
        files = model_hashes.get(variant["model"])
        # A checkpoint file is named by its content, not its path: a moved or copied run folder
        # keeps its scores; a registry model (no file) by its name and its weights' hashes.
        model = [h for h in files if h] if files and all(files[:1]) else variant["model"]
        blob = json.dumps({"scan": record.scan_id, "content": sha256_path(record.scan_path),
                           "pixel_spacing_mm": record.pixel_spacing_mm, "settings": settings,
                           "variant": {**variant, "model": model}, "model_files": files},
                          sort_keys=True, default=str)
        return hashlib.sha1(blob.encode("utf-8")).hexdigest()

    def _model_hashes(self, variants) -> dict:
        """Content hashes of checkpoint files, so a retrained checkpoint at the same path is scored anew."""
        from ZeroShotILDLib.file_hashes import sha256_path

        out = {}
        for v in variants:
            files = [v["model"][len("dapt:"):] if v["model"].startswith("dapt:") else v["model"]]
            if v["model"] == self.base.model and self.base.checkpoint:
                files.append(self.base.checkpoint)
            out[v["model"]] = [sha256_path(f) if Path(f).expanduser().is_file() else None
                               for f in (str(Path(x).expanduser()) for x in files)]
        return out

    def _cached(self, key: str):
        path = self.cache_dir / f"{key}.json"
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            return float(entry["p"]), [float(x) for x in entry["subtypes"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def score(self, records, variants: Sequence[dict], *, quiet: bool) -> tuple:
        """(variant index -> {"ild": (n,), "subtypes": (n, K)}, failures) for ``variants`` of
        ``{"model", "filter_threshold", "retrieval", "montage_size"}``; ``failures`` lists
        (scan_id, one-line reason) and those rows hold NaN."""
        out = {i: {"ild": np.full(len(records), np.nan),
                   "subtypes": np.full((len(records), len(self.base.subtypes)), np.nan)}
               for i in range(len(variants))}
        groups: dict = {}
        for i, v in enumerate(variants):
            groups.setdefault((v["model"], v["filter_threshold"]), []).append(i)
        for model, threshold in groups:  # a missing model is the run's error, not every scan's
            _ = self._analyzer(model, threshold).model
        hashes = self._model_hashes(variants) if self.cache_dir is not None else {}
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        prompt = self.base.prompts[0]
        failures = []
        for n, record in enumerate(_bar(records, desc="scoring scans", quiet=quiet)):
            try:
                keys = ({i: self._key(record, v, hashes) for i, v in enumerate(variants)}
                        if self.cache_dir is not None else {})
                cached = {i: self._cached(k) for i, k in keys.items()}
                if keys and all(c is not None for c in cached.values()):
                    for i, (p_finding, subs) in cached.items():
                        out[i]["ild"][n], out[i]["subtypes"][n] = p_finding, subs
                    continue
                scan, mask = self._scan_and_mask(record)
                for (model, threshold), members in groups.items():
                    analyzer = self._analyzer(model, threshold)
                    analyzer.analyze(scan, lung_mask=mask)
                    for i in members:
                        v = variants[i]
                        result = analyzer.reprompt(retrieval=v["retrieval"], montage_size=v["montage_size"])
                        p_finding = float(result.finding_probabilities[prompt])
                        subs = [float(result.subtype_probabilities[s]) for s in self.base.subtypes]
                        out[i]["ild"][n], out[i]["subtypes"][n] = p_finding, subs
                        if keys:
                            atomic_write_text(self.cache_dir / f"{keys[i]}.json",
                                              json.dumps({"p": p_finding, "subtypes": subs}))
            except InputError as exc:
                failures.append((record.scan_id, str(exc)))
            except (OSError, ValueError, MemoryError) as exc:  # one bad scan never aborts a cohort
                failures.append((record.scan_id, f"{Path(record.scan_path).name} could not be scored "
                                                 f"({type(exc).__name__}): check the file"))
            if failures and failures[-1][0] == record.scan_id:
                log.warning("scan %s not scored: %s", record.scan_id, failures[-1][1])
                for i in out:
                    out[i]["ild"][n] = np.nan
                    out[i]["subtypes"][n] = np.nan
        return out, failures


def _with_pixel_spacing(records, spacing_mm: Optional[float]):
    """Records whose 2-D image rows carry a pixel size (the column, else ``--pixel-spacing-mm``), and a
    one-line note when some have neither (then 1 mm per pixel is assumed, and said)."""
    from .preprocess import DEFAULT_PIXEL_SPACING_MM, is_image

    if spacing_mm is not None and not 0 < spacing_mm < 100:
        raise InputError(f"--pixel-spacing-mm {spacing_mm}: give millimetres per pixel, e.g. 0.7")
    out, missing = [], 0
    for r in records:
        if is_image(r.scan_path) and r.pixel_spacing_mm is None:
            if spacing_mm is None:
                missing += 1
            else:
                r = dataclasses.replace(r, pixel_spacing_mm=float(spacing_mm))
        out.append(r)
    note = None
    if missing:
        note = (f"{missing} 2-D image row(s) have no pixel size (manifest column pixel_spacing_mm or "
                f"--pixel-spacing-mm): {DEFAULT_PIXEL_SPACING_MM:g} mm per pixel assumed, so patch sizes in mm are guesses")
        log.warning(note)
    return out, note


def _add_pixel_spacing_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pixel-spacing-mm", type=float,
                   help="pixel size of 2-D PNG/JPG rows without a pixel_spacing_mm column (default: 1 mm, with a warning)")


def _eval_split(records, split: str, threshold_split: str = "val"):
    """(evaluated records, threshold records, name of the threshold set) for evaluation; never the training split.

    The F1 threshold comes from ``threshold_split`` rows; when that is the evaluated split itself,
    ``none``, or the manifest has no splits, there are none and the threshold is chosen on the
    evaluated scans (labelled optimistic)."""
    have_split = any(r.split for r in records)
    if not have_split:
        return list(records), [], None
    test = [r for r in records if r.split == split]
    if not test:
        raise InputError(f"the manifest has no rows with split {split!r}: choose --split or run `{PROG} split`")
    if threshold_split in (None, "none", split):
        return test, [], None
    val = [r for r in records if r.split == threshold_split]
    return test, val, threshold_split


def _labels(records, label: str = "ild") -> np.ndarray:
    from .manifest import label_value

    return np.array([int(label_value(r, label)) for r in records], dtype=np.int64)


def _both_classes(y: np.ndarray) -> bool:
    return y.size > 0 and 0 < int(y.sum()) < y.size


def _evaluation_sets(args):
    """Evaluated and threshold records of a labelled manifest (2-D rows with their pixel size), the label,
    the threshold set's name (None: no usable set, the threshold is optimistic) and the pixel-size note."""
    from .manifest import check_label, label_value

    records = _read_manifest(args.manifest)
    label = check_label(records, args.label)
    if label == "subtype":
        raise InputError("--label subtype is not a yes/no label: subtypes are scored one against the rest "
                         "automatically; use --label ild or a label_<name> column")
    records, note = _with_pixel_spacing(records, args.pixel_spacing_mm)
    test, val, val_name = _eval_split(records, args.split, args.threshold_split)
    for r in test + val:
        if label_value(r, label) is None:
            raise InputError(f"{r.source}, label {label}: empty; evaluation needs it for every scan")
    if not _both_classes(_labels(test, label)):
        raise InputError(f"the {args.split} rows need both {label}-positive and -negative scans for AUROC")
    if val and not _both_classes(_labels(val, label)):
        log.warning("the %s rows lack one class: the F1 threshold is chosen on the evaluated set (optimistic)", val_name)
        val, val_name = [], None
    return test, val, label, val_name, note


def _row(factors: dict, report) -> dict:
    """A table row: ``plots.grid_row`` plus where the F1 threshold was chosen."""
    from . import plots

    return dict(plots.grid_row(factors, report), threshold_source=report.threshold_source)


def _score_sets(args, base, test, val, variants):
    """Score test + threshold rows; failed scans are dropped from both (listed, never aborting).

    With ``--merge-shards`` the scores come from the shard folders instead (:func:`_merged_scores`).
    """
    if getattr(args, "merge_shards", None):
        scored, failures = _merged_scores(args, base, test + val, variants)
    else:
        out_dir = Path(args.out).expanduser()
        scored, failures = _Scorer(base, cache_dir=out_dir / SCORE_CACHE).score(test + val, variants, quiet=args.quiet)
    return _drop_failed(scored, failures, test, val)


SHARD_FILE = "shard_scores.json"


def _shard_signature(base, records, variants, label: str) -> str:
    """What every shard of one evaluation must share: the scans (all shards'), settings, models, label."""
    import hashlib

    settings = {k: v for k, v in base.to_dict().items() if k not in ("device", "batch_size")}
    blob = json.dumps({"scans": sorted(r.scan_id for r in records), "settings": settings, "variants": variants,
                       "label": label}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()


def _write_shard(args, base, records, variants, label: str) -> int:
    """``evaluate --shard i/N``: score this shard's scans and write ``shard_scores.json`` (no tables)."""
    from .preprocess import parse_shard, shard_records

    index, count = parse_shard(args.shard)
    mine = shard_records(records, (index, count))
    out_dir = Path(args.out).expanduser()
    scored, failures = _Scorer(base, cache_dir=out_dir / SCORE_CACHE).score(mine, variants, quiet=args.quiet)
    failed = dict(failures)
    scans = {r.scan_id: ({"failed": failed[r.scan_id]} if r.scan_id in failed else
                         {"p": [float(scored[i]["ild"][n]) for i in range(len(variants))],
                          "subtypes": [[float(x) for x in scored[i]["subtypes"][n]] for i in range(len(variants))]})
             for n, r in enumerate(mine)}
    with _staged_output(out_dir) as tmp:
        _write_json(tmp / SHARD_FILE, {"format": "zeroshot-ild-train-shard/1", "shard": index, "of": count,
                                       "signature": _shard_signature(base, records, variants, label),
                                       "scans": scans})
    print(f"shard {index}/{count}: {len(mine) - len(failed)} of {len(mine)} scans scored"
          f"{f', {len(failed)} failed' if failed else ''} -> {out_dir / SHARD_FILE}")
    return EXIT_PARTIAL if failed else 0


def _merged_scores(args, base, records, variants) -> tuple:
    """Scores of ``records`` from every shard folder of ``--merge-shards``: all shards 0..N-1 present
    exactly once, of this very evaluation (same scans, settings, models and label), else one line."""
    label = args.label.strip().lower().removeprefix("label_")
    signature = _shard_signature(base, records, variants, label)
    shards: dict = {}
    count = None
    for folder in args.merge_shards:
        path = Path(folder).expanduser() / SHARD_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            index, of = int(data["shard"]), int(data["of"])
        except (OSError, ValueError, KeyError, TypeError):
            raise InputError(f"--merge-shards {folder}: no readable {SHARD_FILE} (run `evaluate --shard i/N` there)") from None
        if data.get("signature") != signature:
            raise InputError(f"--merge-shards {folder}: shard {index}/{of} is of another evaluation (other scans, "
                             "settings, models or label): give the flags the shards ran with")
        if count is not None and of != count:
            raise InputError(f"--merge-shards {folder}: shard {index}/{of} of a {of}-way split, the others are {count}-way")
        if index in shards:
            raise InputError(f"--merge-shards: shard {index}/{of} given twice ({shards[index][0]} and {folder})")
        count = of
        shards[index] = (folder, data["scans"])
    missing = [str(i) for i in range(count or 0) if i not in shards]
    if missing:
        raise InputError(f"--merge-shards: shard(s) {', '.join(missing)} of {count} missing: run them, then merge")
    scans = {k: v for _, part in shards.values() for k, v in part.items()}
    n_sub = len(base.subtypes)
    out = {i: {"ild": np.full(len(records), np.nan), "subtypes": np.full((len(records), n_sub), np.nan)}
           for i in range(len(variants))}
    failures = []
    for n, r in enumerate(records):
        entry = scans.get(r.scan_id)
        if entry is None:
            raise InputError(f"--merge-shards: scan {r.scan_id} is in no shard: the shards cover another manifest")
        if "failed" in entry:
            failures.append((r.scan_id, str(entry["failed"])))
            continue
        for i in range(len(variants)):
            out[i]["ild"][n] = float(entry["p"][i])
            out[i]["subtypes"][n] = [float(x) for x in entry["subtypes"][i]]
    return out, failures


def _drop_failed(scored, failures, test, val):
    failed = {scan_id for scan_id, _ in failures}
    keep = np.array([r.scan_id not in failed for r in test + val], dtype=bool)
    n = len(test)
    scored = {i: {"test": {k: v[:n][keep[:n]] for k, v in entry.items()},
                  "val": {k: v[n:][keep[n:]] for k, v in entry.items()}} for i, entry in scored.items()}
    test = [r for r in test if r.scan_id not in failed]
    val = [r for r in val if r.scan_id not in failed]
    return scored, failures, test, val


def _failure_rows(failures, records) -> list:
    split_of = {r.scan_id: r.split or "" for r in records}
    return [{"scan_id": scan_id, "split": split_of.get(scan_id, ""), "reason": reason} for scan_id, reason in failures]


def _check_after_failures(args, failures, test, val, label, records):
    """Both classes must survive the failed scans; else failures.csv is written and the run ends in one line."""
    if _both_classes(_labels(test, label)):
        if val and not _both_classes(_labels(val, label)):
            return False
        return bool(val)
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    _write_rows(out / "failures.csv", _failure_rows(failures, records))
    raise InputError(f"{len(failures)} scans could not be scored and the rest of the {args.split} rows lack one "
                     f"class: see {out / 'failures.csv'}")


def _failures_markdown(failures, records) -> str:
    if not failures:
        return ""
    lines = ["", f"**{len(failures)} scan(s) could not be scored and are left out** (also in `failures.csv`):", "",
             "| Scan | Split | Reason |", "| --- | --- | --- |"]
    for row in _failure_rows(failures, records):
        lines.append(f"| {row['scan_id']} | {row['split']} | {row['reason'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _notes_markdown(notes: Sequence[str]) -> str:
    return "".join(f"\n> Note: {n}\n" for n in notes if n)


def _threshold_caption(val_name: Optional[str]) -> str:
    from . import metrics

    return (f"F1 threshold chosen on the {val_name} split" if val_name else
            f"F1 threshold {metrics.OPTIMISTIC} (no other labelled split: F1/MCC are optimistic)")


def _warn_degenerate(reports: dict) -> None:
    for name, rep in reports.items():
        if rep.degenerate:
            log.warning("%s: degenerate classifier: %s (F1 %.2f, MCC %.2f)", name, rep.degenerate,
                        rep.f1.value, rep.mcc.value)


def _finish_failures(out: Path, failures, records, final: Path) -> int:
    """failures.csv (also when empty: a re-run that fixed everything must not leave an old list) and the exit code."""
    if failures:
        _write_rows(out / "failures.csv", _failure_rows(failures, records))
    else:
        atomic_write_text(out / "failures.csv", "scan_id,split,reason\n")
    if failures:
        print(f"{len(failures)} scan(s) could not be scored (listed in {final / 'failures.csv'}); "
              f"the results cover the others", file=sys.stderr)
        return EXIT_PARTIAL
    return 0


def _checkpoint_health_notes(models_: Sequence[str]) -> list:
    """One line per evaluated DAPT checkpoint whose own training verdict says it is not healthy."""
    from ZeroShotILDLib.models import read_checkpoint_metadata

    notes = []
    for model in models_:
        if not model.startswith("dapt:"):
            continue
        try:
            health = (read_checkpoint_metadata(Path(model[len("dapt:"):]).expanduser()) or {}).get("training", {}).get("health")
        except (OSError, ValueError, InputError):
            continue
        if isinstance(health, dict) and (health.get("collapsed") is True or health.get("at_chance") is True):
            why = "its image embeddings had collapsed" if health.get("collapsed") is True else "its validation loss was at chance"
            notes.append(f"{model}: its training run recorded this checkpoint as not healthy ({why} at step "
                         f"{health.get('step')}): its scores say nothing about what DAPT can learn")
    return notes


def _bootstrap_groups(records, choice: str) -> tuple:
    """(patient id per record or None, "patients"/"images") for ``--bootstrap auto|patients|images``.

    ``auto`` resamples patients when any row has a patient id (a row without one is its own patient).
    """
    has_ids = any(r.patient_id for r in records)
    if choice == "images" or (choice == "auto" and not has_ids):
        return None, "images"
    if choice == "patients" and not has_ids:
        raise InputError("--bootstrap patients needs a patient_id column: no evaluated row has one")
    return [r.patient_id or f"scan:{r.scan_id}" for r in records], "patients"


def _comparisons_markdown(comparisons, unit: str) -> str:
    if not comparisons:
        return ""
    lines = ["", f"### Paired comparison against {comparisons[0].model_a} (same scans; bootstrap of {unit})", "",
             "| model | AUROC | difference | 95 % CI | p |", "|---|---|---|---|---|"]
    for c in comparisons:
        d = c.difference
        lines.append(f"| {c.model_b} | {c.auroc_b:.3f} | {-d.value:+.3f} | [{-d.ci_high:+.3f}, {-d.ci_low:+.3f}] "
                     f"| {c.p_value:.3f} |")
    return "\n".join(lines) + "\n"


def _cmd_evaluate(args) -> int:
    from . import metrics, plots

    claim_out_dir(args.out, "evaluate")
    base = settings_from_args(args)
    models_ = list(dict.fromkeys(args.models or [base.model]))
    ensembles = {f"ensemble:{Path(p).expanduser().resolve().parent.name}": _ensemble_members(p) for p in args.ensemble or []}
    test, val, label, val_name, note = _evaluation_sets(args)
    all_records = test + val
    members = list(dict.fromkeys(models_ + [m for ms in ensembles.values() for m in ms]))
    variants = [dict(model=m, filter_threshold=base.filter_threshold, retrieval=base.retrieval,
                     montage_size=base.montage_size) for m in members]
    if args.shard:
        if args.merge_shards:
            raise InputError("--shard scores one part, --merge-shards combines them: give one of the two")
        return _write_shard(args, base, all_records, variants, label)
    scored, failures, test, val = _score_sets(args, base, test, val, variants)
    use_val = _check_after_failures(args, failures, test, val, label, all_records)
    y_test, y_val = _labels(test, label), _labels(val, label)
    n = len(test)
    per_model = {m: scored[i] for i, m in enumerate(members)}
    scores = {m: (per_model[m]["val"]["ild"] if use_val else None, per_model[m]["test"]["ild"]) for m in models_}
    sub_scores = {m: (per_model[m]["test"]["subtypes"], per_model[m]["val"]["subtypes"]) for m in models_}
    for name, ms in ensembles.items():
        scores[name] = (metrics.ensemble_probabilities([per_model[m]["val"]["ild"] for m in ms]) if use_val else None,
                        metrics.ensemble_probabilities([per_model[m]["test"]["ild"] for m in ms]))
        sub_scores[name] = tuple(metrics.ensemble_probabilities([per_model[m][part]["subtypes"] for m in ms])
                                 for part in ("test", "val"))
    kw = dict(n_resamples=args.resamples, seed=args.seed)
    groups, unit = _bootstrap_groups(test, args.bootstrap)
    reports = metrics.evaluate_models(scores, y_test, y_val=y_val if use_val else None, ensemble=False,
                                      val_name=f"{val_name} split", groups=groups, **kw)
    _warn_degenerate(reports)
    n_patients = len(set(groups)) if groups is not None else None
    health_notes = _checkpoint_health_notes(members)
    for line in health_notes:
        log.warning("%s", line)
    first = next(iter(reports.values()))
    small = metrics.small_test_set_note(y_test, first.auroc, n_patients=n_patients)
    if small:
        log.warning("%s", small)
    # Every other model against the first, on the same scans (paired bootstrap; patients with ids).
    names = list(scores)
    comparisons = [metrics.paired_comparison(y_test, scores[names[0]][1], scores[b][1], names=(names[0], b),
                                             groups=groups, **kw) for b in names[1:]]
    rows = [_row({"model": name}, rep) for name, rep in reports.items()]
    subtype_rows, subtype_ild_rows = [], []
    subtypes = [r.subtype for r in test]
    if any(subtypes):
        for name, (sub, sub_val) in sub_scores.items():
            for among, target in ((None, subtype_rows), (y_test == 1, subtype_ild_rows)):
                val_kw = {}
                if use_val:
                    val_kw = dict(val_subtypes=[r.subtype for r in val], val_scores=sub_val,
                                  val_among=None if among is None else y_val == 1)
                per = metrics.evaluate_subtypes(subtypes, sub, class_names=base.subtypes, among=among,
                                                val_name=f"{val_name} split", groups=groups, **val_kw, **kw)
                target += [_row({"model": name, "subtype": s}, rep) for s, rep in per.items()]
    finding, negative = base.prompts[0], base.negative_for(0)
    out = Path(args.out).expanduser()
    with _staged_output(out) as tmp:
        who = f" from {n_patients} patients" if n_patients is not None else ""
        caption = (f"## {finding} vs {negative} ({label} labels)\n\n{args.split} split, {n} scans{who} "
                   f"({int(y_test.sum())} positive); {_threshold_caption(val_name if use_val else None)}; "
                   f"95 % bootstrap CIs ({args.resamples} resamples of {unit})")
        plots.write_grid_tables(rows, tmp / "results", factors=["model"], metrics=("auroc", "auprc", "f1", "mcc"),
                                caption=caption)
        extra = (_comparisons_markdown(comparisons, unit) + _notes_markdown([note, small, *health_notes])
                 + _failures_markdown(failures, all_records))
        if extra:
            with open(tmp / "results.md", "a", encoding="utf-8") as handle:
                handle.write(extra)
        if comparisons:
            _write_rows(tmp / "comparisons.csv", [c.to_dict() for c in comparisons])
        titles = {"subtype": "Subtype"}
        if subtype_rows:
            plots.write_grid_tables(subtype_rows, tmp / "subtypes", factors=["model", "subtype"], titles=titles,
                                    caption=f"Table 1 of 2: one subtype vs every other {args.split} scan "
                                            f"({n} scans, as paper 000 Table 4)")
        if subtype_ild_rows:
            plots.write_grid_tables(subtype_ild_rows, tmp / "subtypes_among_positive", factors=["model", "subtype"],
                                    titles=titles, caption=f"Table 2 of 2: one subtype vs the other {label}-positive "
                                    f"{args.split} scans only ({int(y_test.sum())} scans)")
        curves = {name: (y_test, s) for name, (_, s) in scores.items()}
        plots.plot_roc_curves(curves, tmp / "roc.png", title=f"{finding}: ROC")
        plots.plot_pr_curves(curves, tmp / "pr.png", title=f"{finding}: precision-recall")
        score_rows = [dict({"scan_id": r.scan_id, "patient_id": r.patient_id or "", label: int(y_test[k]),
                            "subtype": r.subtype or ""},
                           **{f"p[{name}]": float(s[k]) for name, (_, s) in scores.items()})
                      for k, r in enumerate(test)]
        _write_rows(tmp / "scores.csv", score_rows)
        if use_val:  # the scores the F1 threshold was chosen on, so it can be re-derived
            y_val_rows = [dict({"scan_id": r.scan_id, "patient_id": r.patient_id or "", label: int(y_val[k])},
                               **{f"p[{name}]": float(v[k]) for name, (v, _) in scores.items()})
                          for k, r in enumerate(val)]
            _write_rows(tmp / "threshold_scores.csv", y_val_rows)
        _write_json(tmp / "settings.json", {"settings": base.to_dict(), "models": models_, "ensembles": ensembles,
                                             "split": args.split, "label": label, "prompt": finding, "negative": negative,
                                             "threshold_split": val_name if use_val else None,
                                             "n_test": n, "n_val": len(val) if use_val else 0,
                                             "n_test_patients": n_patients, "bootstrap_unit": unit,
                                             "seed": args.seed, "resamples": args.resamples,
                                             "n_failed": len(failures), "notes": [x for x in [note] if x]})
        code = _finish_failures(tmp, failures, all_records, out)
    for name, rep in reports.items():
        print(f"{name}: AUROC {rep.auroc}  AUPRC {rep.auprc}  F1 {rep.f1} (threshold {rep.threshold:.3f}, "
              f"{rep.threshold_source}){'  DEGENERATE: ' + rep.degenerate if rep.degenerate else ''}")
    args._headline = "; ".join(f"{name} AUROC {rep.auroc}" for name, rep in reports.items())
    for c in comparisons:
        print(f"{c.model_b} - {c.model_a}: AUROC difference {-c.difference.value:+.3f} "
              f"[{-c.difference.ci_high:+.3f}, {-c.difference.ci_low:+.3f}], p = {c.p_value:.3f} (paired, {unit})")
    print(f"results: {out / 'results.md'}")
    return code


def _cmd_grid(args) -> int:
    from . import metrics, plots

    claim_out_dir(args.out, "grid")
    base = settings_from_args(args)
    retrievals = _csv_list(args.retrievals, what="--retrievals") or [base.retrieval]
    models_ = _csv_list(args.models, what="--models") or [base.model]
    sizes = _csv_list(args.montage_sizes, int, what="--montage-sizes") or [base.montage_size]
    thresholds = _csv_list(args.filter_thresholds, float, what="--filter-thresholds") or [base.filter_threshold]
    for r in retrievals:
        if r not in ("clip", "random"):
            raise InputError(f"--retrievals {r!r}: use clip and/or random")
    for s in sizes:
        dataclasses.replace(base, montage_size=s).validate()
    for t in thresholds:
        dataclasses.replace(base, filter_threshold=t).validate()
    test, val, label, val_name, note = _evaluation_sets(args)
    all_records = test + val
    variants = [dict(retrieval=r, model=m, montage_size=s, filter_threshold=t)
                for r in retrievals for m in models_ for s in sizes for t in thresholds]
    scored, failures, test, val = _score_sets(args, base, test, val, variants)
    use_val = _check_after_failures(args, failures, test, val, label, all_records)
    y_test, y_val = _labels(test, label), _labels(val, label)
    n = len(test)
    groups, unit = _bootstrap_groups(test, args.bootstrap)
    rows, curves, reports = [], {}, {}
    for i, v in enumerate(_bar(variants, desc="bootstrap", quiet=args.quiet)):
        s_test, s_val = scored[i]["test"]["ild"], scored[i]["val"]["ild"]
        rep = metrics.evaluate_binary(y_test, s_test, y_val=y_val if use_val else None, s_val=s_val if use_val else None,
                                      n_resamples=args.resamples, seed=args.seed, val_name=f"{val_name} split",
                                      groups=groups)
        rows.append(_row(v, rep))
        cell = f"{v['retrieval']} / {v['model']} / {v['montage_size']}x{v['montage_size']} / {v['filter_threshold']}"
        curves[cell], reports[cell] = (y_test, s_test), rep
    _warn_degenerate(reports)
    factors = ["retrieval", "model", "montage_size", "filter_threshold"]
    finding, negative = base.prompts[0], base.negative_for(0)
    out = Path(args.out).expanduser()
    with _staged_output(out) as tmp:
        plots.write_grid_tables(rows, tmp / "grid", factors=factors,
                                caption=f"## {finding} vs {negative} ({label} labels)\n\n{args.split} split, {n} scans; "
                                        f"{_threshold_caption(val_name if use_val else None)}; paper 000 layout")
        extra = _notes_markdown([note]) + _failures_markdown(failures, all_records)
        if extra:
            with open(tmp / "grid.md", "a", encoding="utf-8") as handle:
                handle.write(extra)
        plots.plot_roc_curves(curves, tmp / "roc.png", title=f"{finding}: ROC")
        plots.plot_pr_curves(curves, tmp / "pr.png", title=f"{finding}: precision-recall")
        # Per-scan scores of every cell: each grid number can be recomputed from them.
        _write_rows(tmp / "scores.csv", [dict({"scan_id": r.scan_id, "patient_id": r.patient_id or "",
                                                label: int(y_test[k])},
                                               **{f"p[{cell}]": float(curves[cell][1][k]) for cell in curves})
                                          for k, r in enumerate(test)])
        _write_json(tmp / "settings.json", {"settings": base.to_dict(), "label": label, "prompt": finding,
                                             "bootstrap_unit": unit, "seed": args.seed, "resamples": args.resamples,
                                             "threshold_split": val_name if use_val else None,
                                             "n_failed": len(failures), "notes": [x for x in [note] if x],
                                             "factors": {"retrieval": retrievals, "model": models_,
                                                         "montage_size": sizes, "filter_threshold": thresholds}})
        code = _finish_failures(tmp, failures, all_records, out)
    print(f"{len(rows)} grid cells: {out / 'grid.md'}")
    return code


# ----------------------------------------------------------------------------------------------
# Reader study, probing, alignment
# ----------------------------------------------------------------------------------------------
def _cmd_reader_export(args) -> int:
    from ZeroShotILDLib.pipeline import Analyzer, montage_for_scan

    from . import reader_study
    from .preprocess import is_image, read_any_scan

    claim_out_dir(args.out, "reader-study export")
    base = settings_from_args(args)
    methods = {"random": dataclasses.replace(base, retrieval="random"), "clip": dataclasses.replace(base, retrieval="clip")}
    if args.dapt_model:
        methods["dapt-clip"] = dataclasses.replace(base, retrieval="clip", model=args.dapt_model, checkpoint=None)
    chosen = _csv_list(args.methods, what="--methods") or list(methods)
    unknown = [m for m in chosen if m not in methods]
    if unknown:
        raise InputError(f"--methods {','.join(unknown)}: use random, clip" + (", dapt-clip" if args.dapt_model else
                                                                             " (dapt-clip needs --dapt-model)"))
    from .manifest import check_label, label_value

    records = _read_manifest(args.manifest)
    if args.split and any(r.split for r in records):
        records = [r for r in records if r.split == args.split]
    if not records:
        raise InputError(f"no rows with split {args.split!r} in the manifest")
    label = args.label.strip().lower()
    has_label = label != "ild" or any(r.ild is not None or r.subtype for r in records)
    label = check_label(records, label) if has_label else label
    # What readers count: the (first) --prompt given, else the label's own name ("ILD" only for the ild label).
    finding = ((args.prompts or [None])[0] or ("ILD" if label == "ild" else label.replace("_", " "))).strip()
    records, _ = _with_pixel_spacing(records, args.pixel_spacing_mm)
    analyzers = {m: Analyzer(methods[m]) for m in chosen if methods[m].retrieval == "clip"}
    montages, failures = {}, []
    for record in _bar(records, desc="montages", quiet=args.quiet):
        try:
            scan = read_any_scan(record.scan_path, base, record.pixel_spacing_mm)
            # Every method's montage or none: readers must see the same scans under each method.
            mine = {(record.scan_id, m): montage_for_scan(scan, methods[m], analyzer=analyzers.get(m),
                                                          whole_image_if_no_lungs=is_image(record.scan_path))[0]
                    for m in chosen}
        except InputError as exc:  # a damaged or lung-less scan is left out, not the whole study
            failures.append((record.scan_id, str(exc)))
            continue
        montages.update(mine)
    if not montages:
        raise InputError(f"none of the {len(records)} scans gave a montage (first: {failures[0][1]})")
    kept = {scan_id for scan_id, _ in montages}
    out = Path(args.out)
    with _staged_output(out) as tmp:
        written = reader_study.export_reader_study(montages, tmp, grid_n=base.montage_size,
                                                   readers=_csv_list(args.readers, what="--readers"),
                                                   blind=args.blind, seed=args.seed)
        def value(r):
            v = label_value(r, label)
            return (1 if r.subtype else v) if label == "ild" else v

        groups = {r.scan_id: ("Positive" if value(r) == 1 else "Negative") for r in records
                  if value(r) is not None and r.scan_id in kept} if has_label else {}
        _write_json(tmp / "study.json", {"grid_n": base.montage_size, "methods": chosen, "groups": groups,
                                          "label": label, "finding": finding, "settings": base.to_dict()})
        code = _finish_failures(tmp, failures, records, out)
    print(f"{len(written['images'])} numbered montages and {len(written['sheets'])} count sheet(s) in {args.out}"
          + ("  (keep key.csv away from readers)" if args.blind else ""))
    return code


def _cmd_reader_analyze(args) -> int:
    from . import plots, reader_study

    claim_out_dir(args.out, "reader-study analyze")
    study = Path(args.study).expanduser()
    meta_path = study / "study.json"
    if not meta_path.is_file():
        raise InputError(f"{study} holds no study.json: give the folder written by `reader-study export`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    key = study / "key.csv"
    counts = reader_study.read_reader_counts(args.sheets, grid_n=int(meta["grid_n"]),
                                             key_path=key if key.is_file() else None)
    rows = reader_study.reader_study_table(counts, grid_n=int(meta["grid_n"]), groups=meta.get("groups") or None,
                                           methods=[m for m in meta["methods"] if any(c.method == m for c in counts)])
    # Studies exported before the finding was recorded counted ILD patches.
    finding = str(meta.get("finding") or "ILD")
    label = str(meta.get("label") or "ild")
    with _staged_output(Path(args.out)) as tmp:
        plots.write_grid_tables(rows, tmp / "reader_study", factors=["group", "method"],
                                metrics=("percent_ild", "icc3_1"),
                                caption=f"Paper 000 Table 6: reader study; patches counted: {finding}; "
                                        f"groups by label {label}",
                                titles={"percent_ild": f"% of Patch Montage with {finding} (Average)",
                                        "group": label}, bold_best=False)
    for r in rows:
        print(f"{r['group']} / {r['method']}: {r['percent_ild']:.1f} % patches with {finding}, "
              f"ICC(3,1) {r['icc3_1']:.3f} ({r['n_readers']} readers, {r['n_scans']} scans)")
    return 0


def _encode_montages(pairs, model, *, quiet: bool) -> np.ndarray:
    """L2-normalised image features of cached montages with the engine's encoder."""
    import torch

    from ZeroShotILDLib.embeddings import ImageEncoder

    from .data import load_montage

    encoder = ImageEncoder(model, batch_size=32)
    feats = []
    for start in _bar(range(0, len(pairs), 32), desc="encoding montages", quiet=quiet):
        pixels = torch.stack([load_montage(p.image_path, model.image_size) for p in pairs[start:start + 32]])
        feats.append(encoder.encode(pixels).numpy())
    return np.concatenate(feats, axis=0)


def _encode_texts(texts: Sequence[str], model) -> np.ndarray:
    import torch

    outs = []
    for start in range(0, len(texts), 64):
        tokens = model.tokenize(list(texts[start:start + 64])).to(model.device)
        with torch.inference_mode():
            f = model.model.encode_text(tokens).float()
        outs.append(torch.nn.functional.normalize(f, dim=-1).cpu().numpy())
    return np.concatenate(outs, axis=0) if outs else np.zeros((0, 1))


def _cmd_probe(args) -> int:
    from ZeroShotILDLib.models import load_model
    from ZeroShotILDLib.scoring import TextEncoder

    from . import linear_probe

    from .manifest import check_label, label_value

    claim_out_dir(args.out, "probe")
    records = _read_manifest(args.manifest)
    label = check_label(records, args.label)
    if label == "subtype":
        records = [r for r in records if r.ild is not None]
        classes = ["no ild"] + sorted({r.subtype.strip().lower() for r in records if r.subtype})
        label_of = lambda r: classes.index(r.subtype.strip().lower()) if r.subtype else (0 if r.ild == 0 else None)
        texts = classes
    else:
        # A yes/no label: zero-shot compares the run's prompt with its negative, never a literal "ild".
        positive = args.prompt or ("interstitial lung disease" if label == "ild" else label.replace("_", " "))
        negative = args.negative or f"no {positive}"
        classes = [f"no {label}", label]
        texts = [negative, positive]
        label_of = lambda r: label_value(r, label)
    records = [r for r in records if label_of(r) is not None]
    train = [r for r in records if r.split == "train"]
    test = [r for r in records if r.split == args.split]
    if not train or not test:
        raise InputError(f"probing needs rows with split train and split {args.split}: run `{PROG} split` first")
    base = _csv_list(args.base, what="--base")
    unknown = [b for b in base if b.lower() not in classes]
    if unknown:
        raise InputError(f"--base {','.join(unknown)}: classes are {', '.join(classes)}")
    model = load_model(args.model, checkpoint=args.checkpoint, weights_dir=args.weights_dir, device=args.device)
    pairs, _ = _pairs(train + test, args.cache)
    features = _encode_montages(pairs, model, quiet=args.quiet)
    y = np.array([label_of(r) for r in train + test])
    xtr, xte, ytr, yte = features[:len(train)], features[len(train):], y[:len(train)], y[len(train):]
    seeds = list(range(args.repeats))
    result = {"classes": classes, "k": args.k,
              "linear_probe": linear_probe.linear_probe_eval(xtr, ytr, xte, yte, k=args.k, seeds=seeds)}
    text = TextEncoder(model)
    prototypes = np.stack([text.embed(c).numpy() for c in texts])
    result["zero_shot_texts"] = list(texts)
    zs = linear_probe.zero_shot_probabilities(xte, prototypes)
    result["zero_shot"] = linear_probe.classification_metrics(yte, zs)
    if base:
        result["base_new"] = linear_probe.base_new_report(
            xtr, ytr, xte, yte, prototypes, base_classes=[classes.index(b.lower()) for b in base], class_names=classes,
            k=args.k, seeds=seeds)
    with _staged_output(Path(args.out)) as tmp:
        _write_json(tmp / "probe.json", result)
        (tmp / "probe.md").write_text(_probe_markdown(result, args.model), encoding="utf-8")
    lp = result["linear_probe"]
    print(f"{args.k}-shot linear probe ({len(classes)} classes, {len(seeds)} draws): ACA {lp['aca_mean']:.3f} "
          f"± {lp['aca_std']:.3f}; zero-shot ACA {result['zero_shot'].get('aca', float('nan')):.3f}")
    if base:
        bn = result["base_new"]
        print(f"base/new Avg. (arithmetic mean, paper 002): zero-shot {bn['zero_shot_avg']:.3f}, linear probe "
              f"{bn['linear_probe_avg']:.3f}; harmonic mean (extra): {bn['zero_shot_hmean']:.3f}, {bn['linear_probe_hmean']:.3f}")
    return 0


def _probe_markdown(result: dict, model: str) -> str:
    """``probe.json`` as a Markdown table (the numbers as they are in the JSON, 3 decimals)."""
    def num(x) -> str:
        return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.3f}"

    lp, zs = result["linear_probe"], result["zero_shot"]
    n_draws = len(lp["runs"])
    lines = [f"## Linear probe and zero-shot: {model}", "",
             f"Classes: {', '.join(result['classes'])}; {result['k']}-shot linear probe over {n_draws} draws "
             "(mean ± SD); zero-shot texts: " + ", ".join(f"\"{t}\"" for t in result["zero_shot_texts"]), "",
             "| method | ACA | accuracy | AUROC |", "|---|---|---|---|",
             f"| {result['k']}-shot linear probe | {num(lp['aca_mean'])} ± {num(lp['aca_std'])} | "
             f"{num(lp.get('accuracy_mean'))} | {num(lp.get('auroc_mean'))} |",
             f"| zero-shot | {num(zs.get('aca'))} | {num(zs.get('accuracy'))} | {num(zs.get('auroc'))} |"]
    bn = result.get("base_new")
    if bn:
        lines += ["", "| base / new | zero-shot ACA | linear probe ACA |", "|---|---|---|"]
        for side in ("base", "new"):
            part = bn[side]
            lines.append(f"| {side}: {', '.join(part['classes'])} | {num(part['zero_shot']['aca'])} | "
                         f"{num(part['linear_probe']['aca_mean'])} |")
        lines += [f"| Avg. (arithmetic, paper 002) | {num(bn['zero_shot_avg'])} | {num(bn['linear_probe_avg'])} |",
                  f"| harmonic mean (extra) | {num(bn['zero_shot_hmean'])} | {num(bn['linear_probe_hmean'])} |"]
    return "\n".join(lines) + "\n"


def _cmd_alignment(args) -> int:
    from ZeroShotILDLib.models import load_model

    from . import alignment, reports

    # Only the chosen split is read for text: rows without a report elsewhere (e.g. image-only
    # negatives kept for evaluation) are not this command's business.
    records = _read_manifest(args.manifest)
    if args.split and any(r.split for r in records):
        records = [r for r in records if r.split == args.split]
    if not records:
        raise InputError(f"no rows with split {args.split!r} in the manifest")
    textless = [r for r in records if r.report_text is None and r.report_path is None]
    if textless:
        raise InputError(f"{len(textless)} of the {len(records)} rows of split {args.split!r} have no report "
                         f"(first: {textless[0].source}): alignment compares images with their reports")
    model = load_model(args.model, checkpoint=args.checkpoint, weights_dir=args.weights_dir, device=args.device)
    pairs, _ = _pairs(records, args.cache)
    counts = reports.text_yield([p.report for p in pairs], args.text_choice)
    warning = reports.yield_warning(counts)
    if warning:
        log.warning(warning)
    texts, sentences, owners = [], [], []
    for i, p in enumerate(pairs):
        text = reports.select_text(p.report, args.text_choice, source=p.source)
        texts.append(text)
        for s in reports.split_sentences(text):
            sentences.append(s)
            owners.append(i)
    images = _encode_montages(pairs, model, quiet=args.quiet)
    result = alignment.alignment_report(images, _encode_texts(texts, model),
                                        _encode_texts(sentences, model) if sentences else None,
                                        np.array(owners) if sentences else None)
    result.update(model=args.model, text=args.text_choice)
    with _staged_output(Path(args.out)) as tmp:
        _write_json(tmp / "alignment.json", result)
    line = f"report-level cosine {result['report_mean']:.3f} ± {result['report_std']:.3f}"
    if "sentence_mean" in result:
        line += f"; sentence-level {result['sentence_mean']:.3f} ± {result['sentence_std']:.3f}"
    print(f"{line} ({result['n_images']} images)")
    return 0


def _cmd_preview_text(args) -> int:
    """What ``--text`` picks from the first reports, on stdout only (the user asked to see them):
    report text never goes to the log or to an error message."""
    from . import reports

    if args.rows < 0:
        raise InputError(f"--rows must be 0 or more, got {args.rows}")
    records = _read_manifest(args.manifest, check_files=False)
    texts = [r.read_report() for r in records]
    for r, text in list(zip(records, texts))[:args.rows]:
        picked = reports.select_text(text or "", args.text_choice, missing="none") if text else None
        print(f"=== {r.scan_id} ({r.source}); parts found: {', '.join(reports.parse_report(text or '').available_texts()) or 'none'}")
        print(picked if picked else f"(no {args.text_choice} text in this report)")
    counts = reports.text_yield(texts, args.text_choice)
    print("=== counts over all rows: " + ", ".join(f"{c} {k} of {counts['n']}" for c, k in
                                                   ((c, counts["by_choice"][c]) for c in reports.TEXT_CHOICES)))
    warning = reports.yield_warning(counts)
    if warning:
        log.warning(warning)
    return 0


def _cmd_runs(args) -> int:
    """The index of a results root: one line per run or evaluation folder under it (its ``run.json``),
    on stdout. Read-only: the index is never stored beside a user's folders."""
    from . import run_record

    root = Path(args.root).expanduser()
    if not root.is_dir():
        raise InputError(f"{root} is not a folder: give the folder that holds your run folders")
    rows = run_record.read_index(root)
    if args.csv:
        from ZeroShotILDLib import csv_files

        writer = csv_files.DictWriter(sys.stdout, fieldnames=list(run_record.INDEX_FIELDS))
        writer.writeheader()
        writer.writerows(rows)
        return 0
    if not rows:
        print(f"no runs under {root} (a run folder holds run.json)")
        return 0
    for r in rows:
        print(f"{r['finished_utc']}  {r['command']:<20} {r['out']:<28} exit {r['exit_code']:<3} "
              f"{r['git_commit'][:10]:<10} {r['headline']}")
    return 0


# ----------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="chexzero", help="registry name, dapt:<checkpoint> or a checkpoint path")
    p.add_argument("--checkpoint", help="weights file for a registry model")
    p.add_argument("--weights-dir", help="folder where registry weights are looked for")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")


#: Two examples per command, shown under its --help.
EPILOGS = {
    "": "exit codes: 0 done, 2 bad input (nothing written), 3 finished but some scans failed (listed), 130 cancelled.\n"
        "examples:\n  zeroshot-ild-train split cohort.csv --out split.csv --stratify ild\n"
        "  zeroshot-ild-train evaluate split.csv --out eval --models clip-vit-b-32-laion --models biomedclip",
    "split": "zeroshot-ild-train split cohort.csv --out split.csv\n"
             "zeroshot-ild-train split cohort.jsonl --out split.jsonl --val-fraction 0.1 --test-fraction 0.2 --stratify subtype",
    "preprocess": "zeroshot-ild-train preprocess split.csv --cache montages --workers 2\n"
                  "zeroshot-ild-train preprocess split.csv --cache montages --shard $SLURM_ARRAY_TASK_ID/16",
    "train": "zeroshot-ild-train train split.csv --cache montages --out run1 --model clip-vit-b-32-laion\n"
             "zeroshot-ild-train train split.csv --cache montages --out run1 --resume",
    "sweep": "zeroshot-ild-train sweep split.csv --cache montages --out sweep\n"
             "zeroshot-ild-train sweep split.csv --cache montages --out sweep --lrs 1e-5,1e-4 --max-steps 2000",
    "export": "zeroshot-ild-train export run1/checkpoints/last.ckpt --out run1.safetensors\n"
              "zeroshot-ild-train export elsewhere/last.ckpt --out m.safetensors --model clip-vit-b-32-laion --loss clip",
    "evaluate": "zeroshot-ild-train evaluate split.csv --out eval --models clip-vit-b-32-laion\n"
                "zeroshot-ild-train evaluate split.csv --out eval --models dapt:run1.safetensors --ensemble run1/ensemble.json",
    "grid": "zeroshot-ild-train grid split.csv --out grid --models clip-vit-b-32-laion,biomedclip\n"
            "zeroshot-ild-train grid split.csv --out grid --retrievals clip,random --montage-sizes 4,8 --filter-thresholds 0.2,0.5",
    "reader-study": "zeroshot-ild-train reader-study export split.csv --out study --readers r1,r2 --blind\n"
                    "zeroshot-ild-train reader-study analyze study r1.csv r2.csv --out study_results",
    "export-study": "zeroshot-ild-train reader-study export split.csv --out study --readers r1,r2\n"
                    "zeroshot-ild-train reader-study export split.csv --out study --methods random,clip --blind",
    "analyze-study": "zeroshot-ild-train reader-study analyze study r1.csv r2.csv --out study_results\n"
                     "zeroshot-ild-train reader-study analyze study sheets/*.csv --out study_results -q",
    "probe": "zeroshot-ild-train probe split.csv --cache montages --out probe --model clip-vit-b-32-laion\n"
             "zeroshot-ild-train probe split.csv --cache montages --out probe --label ild --k 8 --repeats 10",
    "alignment": "zeroshot-ild-train alignment split.csv --cache montages --out align --model clip-vit-b-32-laion\n"
                 "zeroshot-ild-train alignment split.csv --cache montages --out align --model dapt:run1.safetensors",
    "preview-text": "zeroshot-ild-train preview-text cohort.csv --text impression\n"
                    "zeroshot-ild-train preview-text cohort.csv --text findings+impression -n 5",
    "runs": "zeroshot-ild-train runs results/\n"
            "zeroshot-ild-train runs results/ --csv > runs.csv",
}


def _epilog(name: str) -> str:
    text = EPILOGS[name]
    if name == "":
        return text
    return "examples:\n" + "\n".join("  " + line for line in text.splitlines())


def build_parser() -> argparse.ArgumentParser:
    from ZeroShotILDLib import __version__

    from . import reports

    raw = argparse.RawDescriptionHelpFormatter
    parser = OneLineArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=_epilog(""),
                                     formatter_class=raw)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress (bars on a terminal, one line per stage in a log)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log messages (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_command(name, **kwargs):
        return sub.add_parser(name, epilog=_epilog(name), formatter_class=raw, **kwargs)

    p = add_command("split", help="assign train/val/test by patient (never by scan)")
    p.add_argument("manifest")
    p.add_argument("--out", required=True, help="manifest to write (.csv or .jsonl)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of patients for validation (Van Uden et al. 2023: 0.1)")
    p.add_argument("--test-fraction", type=float, default=0.0)
    p.add_argument("--stratify", metavar="LABEL",
                   help="keep each value of this label (ild, subtype or a label_<name> column) in the same "
                        "proportion in every split, patients kept whole (Van Uden et al. 2023 balanced its test set)")
    p.add_argument("--seed", type=int, default=0)

    p = add_command("preprocess", help="cache one montage per scan (resumable, --shard i/N for job arrays)")
    p.add_argument("manifest")
    p.add_argument("--cache", required=True, help="output folder of the montages (one folder per montage setting)")
    p.add_argument("--shard", default="0/1", help="this job's part i/N of the scans (e.g. $SLURM_ARRAY_TASK_ID/16)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes")
    _add_settings_args(p)

    p = add_command("train", help="domain-adaptive pre-training (DAPT) on cached montages and reports")
    _add_training_args(p)

    p = add_command("sweep", help="one training run per learning rate, best by validation loss")
    _add_training_args(p)
    p.add_argument("--lrs", help="comma-separated learning rates (default: 5 log-spaced in [1e-5, 1e-3])")

    p = add_command("export", help="Lightning .ckpt -> engine checkpoint (safetensors)")
    p.add_argument("checkpoint", help="a run's checkpoints/last.ckpt")
    p.add_argument("--out", required=True, help="engine checkpoint to write (.safetensors)")
    g = p.add_argument_group("the run's settings (read from the run folder; give them for a .ckpt kept elsewhere)")
    g.add_argument("--model", help="base model the run trained (registry name, dapt:<checkpoint> or path)")
    g.add_argument("--base-checkpoint", help="weights file of that base model, if the run was given --checkpoint")
    g.add_argument("--weights-dir", help="folder where registry weights are looked for")
    g.add_argument("--loss", help="loss the run trained with (clip, relaxed, slip, uniclip, unicl, dlilp)")
    g.add_argument("--classes", help="comma-separated label classes of a unicl/dlilp run")

    for name, helptext in (("evaluate", "AUROC/AUPRC/F1 with bootstrap CIs, per subtype, ensembles, ROC/PR curves"),
                           ("grid", "retrieval x model x montage size x filter threshold (the tables of Van Uden et al. 2023)")):
        p = add_command(name, help=helptext)
        p.add_argument("manifest", help="labelled manifest (ild column; split column to pick test/val rows)")
        p.add_argument("--out", required=True)
        p.add_argument("--split", default="test", help="rows to evaluate (default test)")
        p.add_argument("--threshold-split", default="val",
                       help="rows that choose the F1 threshold (default val; 'none', or the evaluated split itself, "
                            "chooses it on the evaluated rows and labels F1/MCC optimistic)")
        p.add_argument("--label", default="ild", help="yes/no label to evaluate: ild or any label_<name> column (e.g. covid)")
        p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
        p.add_argument("--bootstrap", default="auto", choices=("auto", "patients", "images"),
                       help="resampled unit of the CIs: auto = patients when the manifest has patient ids "
                            "(images of one patient are not independent), else images")
        _add_pixel_spacing_arg(p)
        _add_settings_args(p)
        if name == "evaluate":
            p.add_argument("--models", action="append", metavar="MODEL",
                           help="model to evaluate, repeatable (default --model); dapt:<ckpt> uses the DAPT model "
                           "to pick the patches and to classify (the best configuration of Van Uden et al. 2023)")
            p.add_argument("--ensemble", action="append", metavar="ENSEMBLE_JSON",
                           help="a run's ensemble.json: average the probabilities of its top-k checkpoints")
            p.add_argument("--shard", help="score only part i/N of the scans into --out (shard_scores.json, no tables), "
                                           "e.g. $SLURM_ARRAY_TASK_ID/16; combine with --merge-shards")
            p.add_argument("--merge-shards", nargs="+", metavar="SHARD_DIR",
                           help="the --out folders of every shard: checks all N are there and of this evaluation, then "
                                "writes the tables exactly as one unsharded run would")
        else:
            p.add_argument("--retrievals", help="comma list of clip,random")
            p.add_argument("--models", help="comma list of models (registry names, dapt:<ckpt>)")
            p.add_argument("--montage-sizes", help="comma list of 4,8,16")
            p.add_argument("--filter-thresholds", help="comma list, e.g. 0.2,0.5,0.8")

    p = add_command("reader-study", help="numbered montages for readers and ICC(3,1) of their counts")
    rs = p.add_subparsers(dest="action", required=True)
    q = rs.add_parser("export", help="write numbered montages and blank count sheets", epilog=_epilog("export-study"),
                      formatter_class=raw)
    q.add_argument("manifest")
    q.add_argument("--out", required=True)
    q.add_argument("--methods", help="comma list of random,clip,dapt-clip (default: all available)")
    q.add_argument("--dapt-model", help="dapt:<ckpt> for the dapt-clip method")
    q.add_argument("--readers", help="comma list of reader codes (one sheet each)")
    q.add_argument("--blind", action="store_true", help="neutral image names, shuffled; key.csv maps them back")
    q.add_argument("--split", default="test", help="rows to export when the manifest has splits")
    q.add_argument("--label", default="ild", help="yes/no label that groups the scans (Positive/Negative): ild or any "
                                                   "label_<name> column")
    _add_pixel_spacing_arg(q)
    _add_settings_args(q)
    q = rs.add_parser("analyze", help="read filled sheets, write the reader-study table (Van Uden et al. 2023, Table 6)",
                      epilog=_epilog("analyze-study"), formatter_class=raw)
    q.add_argument("study", help="folder written by `reader-study export`")
    q.add_argument("sheets", nargs="+", help="filled count sheets (CSV)")
    q.add_argument("--out", required=True)
    q.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS)

    p = add_command("probe", help="K-shot linear probing on frozen montage features, zero-shot, base/new "
                       "(Silva-Rodriguez et al. 2025)")
    p.add_argument("manifest")
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--label", default="subtype",
                   help="classes: subtype (no ild + subtypes), ild (yes/no) or any label_<name> column (yes/no)")
    p.add_argument("--k", type=int, default=16, help="cases per class (Silva-Rodriguez et al. 2025: 16)")
    p.add_argument("--repeats", type=int, default=5, help="K-shot draws (seeds)")
    p.add_argument("--base", help="comma list of base classes (seen in pre-training) for the base/new report")
    p.add_argument("--split", default="test", help="evaluation rows (train rows are probed on)")
    p.add_argument("--prompt", help="zero-shot text of the positive class of a yes/no label (default: the label name, "
                                    "'interstitial lung disease' for ild)")
    p.add_argument("--negative", help="zero-shot text of the negative class (default: 'no ' + the prompt)")
    _add_model_args(p)

    p = add_command("alignment", help="report- and sentence-level image-text cosine similarity (Jang et al. 2022)")
    p.add_argument("manifest")
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--text", dest="text_choice", default=DEFAULT_TEXT, choices=reports.TEXT_CHOICES,
                   help=f"report part (default {DEFAULT_TEXT}, the default recipe's, as for train)")
    p.add_argument("--split", default="test", help="rows to use when the manifest has splits")
    _add_model_args(p)

    p = add_command("runs", help="list the runs and evaluations under a results folder (their run.json; stdout only)")
    p.add_argument("root", help="folder holding run/evaluation folders")
    p.add_argument("--csv", action="store_true", help="CSV on stdout instead of aligned lines")

    p = add_command("preview-text", help="show what --text picks from the first reports of a manifest (stdout only)")
    p.add_argument("manifest")
    p.add_argument("--text", dest="text_choice", default=DEFAULT_TEXT, choices=reports.TEXT_CHOICES,
                   help=f"report part (default {DEFAULT_TEXT}, the default recipe's, as for train)")
    p.add_argument("-n", "--rows", type=int, default=3, help="reports shown (default 3; counts cover every row)")
    _add_config_args(parser)
    return parser


#: Options every command takes from the top-level parser; never settings of a run.
_CONFIG_EXCLUDED = {"command", "action", "config", "print_config", "help", "verbose", "version"}


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    """--config FILE and --print-config on every (sub)command parser that runs something."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        parser.add_argument("--config", metavar="FILE",
                            help="YAML file of this command's settings (keys as printed by --print-config); "
                            "flags on the command line win")
        parser.add_argument("--print-config", action="store_true",
                            help="print the effective settings as YAML (usable as --config) and exit")
        return
    for sub in subs:
        for child in sub.choices.values():
            _add_config_args(child)


def _command_parser(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple:
    """(sub-parser, its name) of the command named in argv, or (None, "") if none is."""
    chosen, names = parser, []
    for token in argv:
        subs = [a for a in chosen._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            break
        if token in subs[0].choices:
            chosen = subs[0].choices[token]
            names.append(token)
    return (chosen, " ".join(names)) if names else (None, "")


def _config_path(argv: Sequence[str]) -> Optional[str]:
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--config="):
            return token.split("=", 1)[1]
    return None


def _settings_keys(command: argparse.ArgumentParser) -> dict:
    """key -> action for every setting of a command: its dest and its long option without dashes."""
    keys: dict = {}
    for action in command._actions:
        if action.dest in _CONFIG_EXCLUDED or isinstance(action, argparse._HelpAction):
            continue
        keys[action.dest] = action
        for option in action.option_strings:
            if option.startswith("--"):
                keys.setdefault(option[2:], action)
                keys.setdefault(option[2:].replace("-", "_"), action)
    return keys


def _load_config(path: str, command: argparse.ArgumentParser, name: str) -> dict:
    """dest -> value from a YAML file; unknown keys are refused in one line."""
    from ZeroShotILDLib.settings import config_value, read_config_file

    file = Path(path).expanduser()
    # Size, encoding, YAML syntax, nesting and every value's type: one line naming the key (settings.py).
    data = read_config_file(file)
    keys = _settings_keys(command)
    unknown = sorted(str(k) for k in data if str(k) not in keys)
    if unknown:
        raise InputError(f"--config {file.name}: unknown settings for `{name}`: {', '.join(unknown)} "
                         f"(see `{PROG} {name} --print-config`)")
    return {keys[k].dest: config_value(k, v, keys[k], where=f"--config {file.name}") for k, v in data.items()}


def _parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]):
    """Parse argv; a --config file's values become the command's defaults first (argv wins)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = _config_path(argv)
    command, name = _command_parser(parser, argv)
    if path and command is not None:
        values = _load_config(path, command, name)
        for action in command._actions:
            if action.dest in values:
                # A value from the file satisfies a required option or positional.
                action.required = False
                if not action.option_strings:
                    action.nargs = "?"
                action.default = values[action.dest]
        command.set_defaults(**values)
    return parser.parse_args(argv)


def _print_config(args) -> int:
    import yaml

    if args.command in ("train", "sweep"):
        _apply_recipe(args)
    settings = {k: v for k, v in vars(args).items() if k not in _CONFIG_EXCLUDED}
    print(yaml.safe_dump(settings, sort_keys=False, allow_unicode=True), end="")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = sum(a.count("v") for a in argv if a.startswith("-") and not a.startswith("--") and set(a[1:]) == {"v"})
    verbose += argv.count("--verbose")
    logging.basicConfig(level=log_level(verbose), format=f"{PROG}: %(message)s")
    quiet_itk()
    try:
        parser = build_parser()
    except InputError as exc:  # e.g. the optional training dependencies are missing
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    try:
        args = _parse(parser, argv)
    except InputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    if getattr(args, "print_config", False):
        return _print_config(args)
    progress = TqdmProgress(enabled=not args.quiet, prog=PROG)
    try:
        code = _run_command(args, progress)
        _record_run(args, argv, code)
        return code
    except InputError as exc:
        progress.close()
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except (Cancelled, KeyboardInterrupt):
        progress.close()
        print(f"{PROG}: cancelled; finished outputs kept, nothing half-written", file=sys.stderr)
        return EXIT_CANCELLED
    finally:
        progress.close()
        finish_all()  # record what this command wrote into its --out (training.files)


def _record_run(args, argv: Sequence[str], code: int) -> None:
    """``run.json`` + ``config.yaml`` in a finished command's ``--out`` folder and a row in the index above
    it (``training.run_record``); rank 0 of a multi-process run only."""
    from . import run_record

    out = getattr(args, "out", None)
    if code not in (0, EXIT_PARTIAL) or not out or not Path(out).expanduser().is_dir():
        return
    if int(os.environ.get("RANK", "0") or 0) != 0 or int(os.environ.get("LOCAL_RANK", "0") or 0) != 0:
        return
    command = args.command + (f" {args.action}" if getattr(args, "action", None) else "")
    settings = {k: v for k, v in vars(args).items() if k not in _CONFIG_EXCLUDED and not k.startswith("_")}
    try:
        run_record.write_run_record(Path(out), command, argv, settings, exit_code=code,
                                    headline=getattr(args, "_headline", ""))
    except OSError as exc:  # the results are written; a missing record is not worth failing them for
        log.warning("no run record in %s (%s)", out, exc)


def _run_command(args, progress) -> int:
    if args.command == "preprocess":
        return _cmd_preprocess(args, progress)
    if args.command == "reader-study":
        return _cmd_reader_export(args) if args.action == "export" else _cmd_reader_analyze(args)
    commands = {"split": _cmd_split, "train": _cmd_train, "sweep": _cmd_sweep, "export": _cmd_export,
                "evaluate": _cmd_evaluate, "grid": _cmd_grid, "probe": _cmd_probe, "preview-text": _cmd_preview_text,
                "runs": _cmd_runs}
    return commands.get(args.command, _cmd_alignment)(args)


if __name__ == "__main__":
    sys.exit(main())
