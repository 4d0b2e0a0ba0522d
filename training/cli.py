"""``zeroshot-ild-train``: the researcher's command line over ``training/`` and the engine.

    zeroshot-ild-train split        MANIFEST --out SPLIT.csv          patient-level train/val/test
    zeroshot-ild-train preprocess   MANIFEST --cache DIR              cached montages (--shard i/N)
    zeroshot-ild-train train        MANIFEST --cache DIR --out RUN    DAPT (any loss, DDP, --resume)
    zeroshot-ild-train sweep        MANIFEST --cache DIR --out DIR    learning-rate sweep
    zeroshot-ild-train export       RUN/checkpoints/last.ckpt --out MODEL.safetensors
    zeroshot-ild-train evaluate     MANIFEST --out DIR --model M ...  AUROC/AUPRC/F1 with 95 % CIs
    zeroshot-ild-train grid         MANIFEST --out DIR ...            paper 000's tables
    zeroshot-ild-train reader-study export|analyze ...                numbered montages, ICC(3,1)
    zeroshot-ild-train probe        MANIFEST --cache DIR --out DIR    K-shot linear probing
    zeroshot-ild-train alignment    MANIFEST --cache DIR --out DIR    image-text alignment

Every command is a thin adapter: montages, models and scores come from the engine
(``ZeroShotILDLib``), training from ``training.dapt``, metrics and tables from
``training.metrics`` / ``training.plots``. Bad input ends with one line on stderr and exit
code 2; result folders are written to a temporary folder and moved into place at the end, so
an interrupted command leaves no half-written results.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ZeroShotILDLib.cli import EXIT_CANCELLED, EXIT_INPUT, TqdmProgress, _add_settings_args, settings_from_args
from ZeroShotILDLib.errors import Cancelled, InputError
from ZeroShotILDLib.settings import AnalysisSettings

from .files import atomic_path, atomic_write_text

PROG = "zeroshot-ild-train"
#: Written by ``preprocess`` beside the montages: the engine settings they were built with.
CACHE_SETTINGS = "preprocess_settings.json"
log = logging.getLogger(PROG)


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
def _bar(iterable, *, total: Optional[int] = None, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=quiet, file=sys.stderr, leave=False, dynamic_ncols=True)


@contextmanager
def _staged_output(out: Path):
    """A staging folder beside ``out`` whose files are moved into ``out`` (one atomic rename each) on success.

    Only the file names the command writes are replaced in ``out``; anything else there stays. The
    staging folder carries the process id, so the next run removes those left by killed runs.
    """
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_dead_staging(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()  # plain mkdir: the umask decides who may read the results
    try:
        yield tmp
        out.mkdir(parents=True, exist_ok=True)
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                target = out / path.relative_to(tmp)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _clean_dead_staging(out: Path) -> None:
    """Staging folders ``.NAME.partial-PID`` of processes that no longer run (a kill leaves them)."""
    from ZeroShotILDLib.outputs import _pid_alive

    pattern = re.compile(rf"^\.{re.escape(out.name)}\.partial-(\d+)$")
    for entry in out.parent.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _pid_alive(int(match[1])):
            shutil.rmtree(entry, ignore_errors=True)


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
        writer = csv.DictWriter(handle, fieldnames=fields)
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


def _pairs(records, cache: str, class_names=None):
    """PairRecords for the records whose montage is in the cache; one-line error if any is missing."""
    from . import preprocess
    from .data import pairs_from_manifest

    settings = _cache_settings(cache)
    montages = preprocess.finished_montages(records, cache, settings)
    missing = [r for r in records if r.scan_id not in montages]
    if missing:
        raise InputError(f"{len(missing)} of {len(records)} scans have no finished montage in {cache} "
                         f"(first: {missing[0].source}): run preprocess (every shard) with the same settings")
    return pairs_from_manifest(records, montages, class_names), settings


# ----------------------------------------------------------------------------------------------
# split / preprocess
# ----------------------------------------------------------------------------------------------
def _cmd_split(args) -> int:
    from .manifest import split_by_patient, split_counts, write_manifest

    records = _read_manifest(args.manifest, check_files=False)
    split = split_by_patient(records, val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed)
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    # write_manifest picks CSV or JSONL by the suffix, so the temporary name keeps it.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial{out.suffix}")
    try:
        write_manifest(split, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    for name, counts in sorted(split_counts(split).items(), key=lambda kv: str(kv[0])):
        print(f"{name}: {counts['scans']} scans, {counts['patients']} patients")
    print(f"written {out}")
    return 0


def _cmd_preprocess(args, progress) -> int:
    from . import preprocess

    settings = settings_from_args(args)
    shard = preprocess.parse_shard(args.shard)
    if args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    records = _read_manifest(args.manifest)
    cache = Path(args.cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
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
    for scan_id, reason in summary.failed:
        print(f"  failed {scan_id}: {reason}", file=sys.stderr)
    return 1 if summary.failed else 0


# ----------------------------------------------------------------------------------------------
# train / sweep / export
# ----------------------------------------------------------------------------------------------
def _add_training_args(p: argparse.ArgumentParser) -> None:
    from . import dapt, reports

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
                   help="clip | relaxed (paper 001 eq. 3) | slip | uniclip | unicl, dlilp (need labels)")
    g.add_argument("--relaxed-positives", action="store_true", help="also relax the positives of slip/uniclip (paper 001 'w/ ours')")
    g.add_argument("--relax-threshold", type=float, default=d.relax_threshold, help="t of eq. 3 (0.5)")
    g.add_argument("--relax-slope", type=float, default=d.relax_slope, help="alpha of eq. 3 (10)")
    g.add_argument("--dlilp-text-weight", type=float, default=d.dlilp_text_weight, help="lambda of DLILP (0.1)")
    g.add_argument("--classes", help="comma-separated label classes for unicl/dlilp (default: ild, no ild, subtypes, label_* columns)")
    g.add_argument("--recipe", default=dapt.DEFAULT_RECIPE, choices=tuple(dapt.RECIPES),
                   help="paper000 (default): impression, whole text; paper001: findings+impression, 3 sampled sentences")
    g.add_argument("--text", dest="text_choice", default=None, choices=reports.TEXT_CHOICES,
                   help="report part to train on (default: the recipe's; full = whole text, e.g. captions)")
    g.add_argument("--sentences", type=int, default=None,
                   help="sentences sampled per report and step (default: the recipe's; 0 = whole text)")
    g.add_argument("--no-augment", action="store_true", help="no weak (geometric) augmentation of the CLIP/UniCL/DLILP image")
    g.add_argument("--intensity-augment", action="store_true",
                   help="add brightness/contrast 0.5-2 to augmented views (changes HU-window density; off by default)")
    g = p.add_argument_group("optimisation (defaults: paper 000 / 001)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per device and step")
    g.add_argument("--lr", type=float, default=d.learning_rate, help="peak learning rate")
    g.add_argument("--optimizer", default=d.optimizer, choices=dapt.OPTIMIZERS)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--max-epochs", type=int, default=None,
                   help=f"epoch limit (default: none with --max-steps, else {dapt.DEFAULT_MAX_EPOCHS}); the earlier limit wins")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer-step limit (-1 = none)")
    g.add_argument("--grad-clip", type=float, default=d.gradient_clip_norm, help="max gradient norm (0 = off)")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction, help="patients held out when the manifest has no split")
    g.add_argument("--val-every", type=int, default=d.val_every_steps, help="validate and checkpoint every N steps")
    g.add_argument("--patience", type=int, default=d.patience_steps, help="early-stopping patience in steps")
    g.add_argument("--top-k", type=int, default=d.top_k, help="checkpoints kept (and ensembled) by the monitor")
    g.add_argument("--monitor", default=d.monitor, choices=tuple(dapt.MONITORS),
                   help="checkpoint, early-stopping and sweep criterion: val_loss (paper 000) or val_auroc "
                   "(zero-shot AUROC on the validation labels)")
    g.add_argument("--logger", default=d.logger, choices=dapt.LOGGERS,
                   help="metrics.csv is always written; tensorboard / mlflow add their logs (if installed)")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("hardware")
    g.add_argument("--accelerator", default=d.accelerator, help="auto | cpu | gpu")
    g.add_argument("--devices", default="1", help="devices per node: a count, 'auto', or ids '0,1'")
    g.add_argument("--num-nodes", type=int, default=d.num_nodes, help="nodes (multi-node DDP; launch with srun/torchrun)")
    g.add_argument("--strategy", default=d.strategy, help="auto (DDP when several processes) | ddp | ddp_spawn ...")
    g.add_argument("--precision", default=d.precision, help="auto (bf16-mixed on GPU, 32-true on CPU) | 32-true | 16-mixed ...")
    g.add_argument("--workers", type=int, default=d.num_workers, help="data-loader processes per device")
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
    from . import dapt

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
        seed=args.seed, progress_bar=not args.quiet, montage_settings=montage_settings.to_dict(),
    )


def _training_inputs(args):
    from .data import default_class_names

    needs_labels = args.loss in ("unicl", "dlilp")
    records = _read_manifest(args.manifest, require_report=not needs_labels)
    classes = tuple(_csv_list(args.classes, what="--classes")) if args.classes else ()
    if needs_labels and not classes:
        classes = default_class_names(records)
    pairs, settings = _pairs(records, args.cache, classes or None)
    return pairs, classes, settings


def _print_fit(result, label: str = "") -> None:
    head = f"{label}: " if label else ""
    if result.best_checkpoint:
        score = f"best {result.monitor} {result.best_score:.4f}" if result.best_score is not None else "best checkpoint"
        if result.monitor != "val_loss" and result.best_val_loss is not None:
            score += f" (val loss {result.best_val_loss:.4f})"
        print(f"{head}{score} after {result.global_step} steps"
              f"{' (stopped early)' if result.stopped_early else ''}: {result.best_checkpoint}")
    else:
        print(f"{head}{result.global_step} steps, no checkpoint scored")
    if result.limited_by:
        print(f"{head}length set by {result.limited_by.replace('_', '-')}")
    last = (result.health or {}).get("last") or {}
    if last:
        parts = [f"{k[4:]} {v:.3f}" for k, v in last.items() if k != "val_loss"]
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

    pairs, classes, settings = _training_inputs(args)
    config = _config_from_args(args, args.out, classes, settings)
    try:
        result = dapt.fit(config, pairs, resume=args.resume)
    except dapt.RunInterrupted as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
    if result.summary_json:  # rank 0 only
        _print_fit(result)
    return 0


def _cmd_sweep(args) -> int:
    from . import dapt

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
    """ILD and subtype probabilities of scans for several model/settings variants.

    Each scan is read and its lungs segmented once; every variant then runs the engine's
    ``Analyzer`` on that mask. Variants that differ only in retrieval or montage size share one
    analysis and are re-scored with ``Analyzer.reprompt`` (no patch is encoded twice).
    """

    def __init__(self, base: AnalysisSettings):
        self.base = base
        self._analyzers: dict = {}

    def _analyzer(self, model: str, filter_threshold: float):
        from ZeroShotILDLib.pipeline import Analyzer

        key = (model, filter_threshold)
        if key not in self._analyzers:
            settings = dataclasses.replace(self.base, model=model, filter_threshold=filter_threshold,
                                           checkpoint=self.base.checkpoint if model == self.base.model else None)
            self._analyzers[key] = Analyzer(settings)
        return self._analyzers[key]

    def score(self, records, variants: Sequence[dict], *, quiet: bool) -> dict:
        """variant index -> {"ild": (n,), "subtypes": (n, K)} for ``variants`` of
        ``{"model", "filter_threshold", "retrieval", "montage_size"}``."""
        from ZeroShotILDLib import lung_mask
        from ZeroShotILDLib.scan import read_scan

        out = {i: {"ild": np.empty(len(records)), "subtypes": np.empty((len(records), len(self.base.subtypes)))}
               for i in range(len(variants))}
        groups: dict = {}
        for i, v in enumerate(variants):
            groups.setdefault((v["model"], v["filter_threshold"]), []).append(i)
        prompt = self.base.prompts[0]
        for n, record in enumerate(_bar(records, desc="scoring scans", quiet=quiet)):
            scan = read_scan(record.scan_path)
            mask = lung_mask.segment_lungs(scan.hu, scan.spacing_mm, self.base.lung)
            for (model, threshold), members in groups.items():
                analyzer = self._analyzer(model, threshold)
                analyzer.analyze(scan, lung_mask=mask)
                for i in members:
                    v = variants[i]
                    result = analyzer.reprompt(retrieval=v["retrieval"], montage_size=v["montage_size"])
                    out[i]["ild"][n] = result.finding_probabilities[prompt]
                    out[i]["subtypes"][n] = [result.subtype_probabilities[s] for s in self.base.subtypes]
        return out


def _eval_split(records, split: str):
    """(test records, validation records) for evaluation; never the training split."""
    have_split = any(r.split for r in records)
    if not have_split:
        return list(records), []
    test = [r for r in records if r.split == split]
    if not test:
        raise InputError(f"the manifest has no rows with split {split!r}: choose --split or run `{PROG} split`")
    val = [r for r in records if r.split == "val"] if split != "val" else []
    return test, val


def _labels(records) -> np.ndarray:
    return np.array([int(r.ild) for r in records], dtype=np.int64)


def _both_classes(y: np.ndarray) -> bool:
    return y.size > 0 and 0 < int(y.sum()) < y.size


def _evaluation_sets(args):
    """Test and validation records of a labelled manifest, their ILD labels, and whether the
    validation set can choose the F1 threshold (it needs both classes); AUROC needs both in test."""
    records = _read_manifest(args.manifest, require_ild=True)
    test, val = _eval_split(records, args.split)
    y_test, y_val = _labels(test), _labels(val)
    if not _both_classes(y_test):
        raise InputError(f"the {args.split} rows need both ILD-positive and -negative scans for AUROC")
    return test, val, y_test, y_val, _both_classes(y_val)


def _row(factors: dict, report) -> dict:
    """A table row: ``plots.grid_row`` plus where the F1 threshold was chosen."""
    from . import plots

    return dict(plots.grid_row(factors, report), threshold_source=report.threshold_source)


def _cmd_evaluate(args) -> int:
    from . import metrics, plots

    base = settings_from_args(args)
    models_ = list(dict.fromkeys(args.models or [base.model]))
    ensembles = {f"ensemble:{Path(p).expanduser().resolve().parent.name}": _ensemble_members(p) for p in args.ensemble or []}
    test, val, y_test, y_val, use_val = _evaluation_sets(args)
    members = list(dict.fromkeys(models_ + [m for ms in ensembles.values() for m in ms]))
    variants = [dict(model=m, filter_threshold=base.filter_threshold, retrieval=base.retrieval,
                     montage_size=base.montage_size) for m in members]
    scored = _Scorer(base).score(test + (val if use_val else []), variants, quiet=args.quiet)
    n = len(test)
    per_model = {m: scored[i] for i, m in enumerate(members)}
    scores = {m: (per_model[m]["ild"][n:] if use_val else None, per_model[m]["ild"][:n]) for m in models_}
    sub_scores = {m: per_model[m]["subtypes"] for m in models_}
    for name, ms in ensembles.items():
        ild = metrics.ensemble_probabilities([per_model[m]["ild"] for m in ms])
        scores[name] = (ild[n:] if use_val else None, ild[:n])
        sub_scores[name] = metrics.ensemble_probabilities([per_model[m]["subtypes"] for m in ms])
    kw = dict(n_resamples=args.resamples, seed=args.seed)
    reports = metrics.evaluate_models(scores, y_test, y_val=y_val if use_val else None, ensemble=False, **kw)
    rows = [_row({"model": name}, rep) for name, rep in reports.items()]
    subtype_rows = []
    subtypes = [r.subtype for r in test]
    if any(subtypes):
        val_kw = {}
        if use_val:
            val_kw = dict(val_subtypes=[r.subtype for r in val], val_among=y_val == 1)
        for name, sub in sub_scores.items():
            if use_val:
                val_kw["val_scores"] = sub[n:]
            per = metrics.evaluate_subtypes(subtypes, sub[:n], class_names=base.subtypes, among=y_test == 1,
                                            **val_kw, **kw)
            subtype_rows += [_row({"model": name, "subtype": s}, rep) for s, rep in per.items()]
    with _staged_output(Path(args.out)) as tmp:
        caption = (f"ILD vs no ILD on the {args.split} split ({n} scans); F1 threshold chosen on the "
                   f"{'validation' if use_val else 'test'} set; 95 % bootstrap CIs ({args.resamples} resamples)")
        plots.write_grid_tables(rows, tmp / "results", factors=["model"], metrics=("auroc", "auprc", "f1", "mcc"),
                                caption=caption)
        if subtype_rows:
            plots.write_grid_tables(subtype_rows, tmp / "subtypes", factors=["model", "subtype"],
                                    caption="One subtype vs the other ILD scans (paper 000 Table 4)")
        curves = {name: (y_test, s) for name, (_, s) in scores.items()}
        plots.plot_roc_curves(curves, tmp / "roc.png", title="ILD: ROC")
        plots.plot_pr_curves(curves, tmp / "pr.png", title="ILD: precision-recall")
        score_rows = [dict({"scan_id": r.scan_id, "ild": int(r.ild), "subtype": r.subtype or ""},
                           **{f"p_ild[{name}]": float(s[k]) for name, (_, s) in scores.items()})
                      for k, r in enumerate(test)]
        _write_rows(tmp / "scores.csv", score_rows)
        _write_json(tmp / "settings.json", {"settings": base.to_dict(), "models": models_, "ensembles": ensembles,
                                             "split": args.split, "n_test": n, "n_val": len(val) if use_val else 0})
    for name, rep in reports.items():
        print(f"{name}: AUROC {rep.auroc}  AUPRC {rep.auprc}  F1 {rep.f1} (threshold {rep.threshold:.3f}, "
              f"{rep.threshold_source})")
    print(f"results: {Path(args.out) / 'results.md'}")
    return 0


def _cmd_grid(args) -> int:
    from . import metrics, plots

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
    test, val, y_test, y_val, use_val = _evaluation_sets(args)
    variants = [dict(retrieval=r, model=m, montage_size=s, filter_threshold=t)
                for r in retrievals for m in models_ for s in sizes for t in thresholds]
    scored = _Scorer(base).score(test + (val if use_val else []), variants, quiet=args.quiet)
    n = len(test)
    rows, curves = [], {}
    for i, v in enumerate(_bar(variants, desc="bootstrap", quiet=args.quiet)):
        s = scored[i]["ild"]
        rep = metrics.evaluate_binary(y_test, s[:n], y_val=y_val if use_val else None, s_val=s[n:] if use_val else None,
                                      n_resamples=args.resamples, seed=args.seed)
        rows.append(_row(v, rep))
        curves[f"{v['retrieval']} / {v['model']} / {v['montage_size']}x{v['montage_size']} / {v['filter_threshold']}"] = (y_test, s[:n])
    factors = ["retrieval", "model", "montage_size", "filter_threshold"]
    with _staged_output(Path(args.out)) as tmp:
        plots.write_grid_tables(rows, tmp / "grid", factors=factors,
                                caption=f"ILD classification on the {args.split} split ({n} scans), paper 000 layout")
        plots.plot_roc_curves(curves, tmp / "roc.png", title="ILD: ROC")
        plots.plot_pr_curves(curves, tmp / "pr.png", title="ILD: precision-recall")
        _write_json(tmp / "settings.json", {"settings": base.to_dict(), "factors": {
            "retrieval": retrievals, "model": models_, "montage_size": sizes, "filter_threshold": thresholds}})
    print(f"{len(rows)} grid cells: {Path(args.out) / 'grid.md'}")
    return 0


# ----------------------------------------------------------------------------------------------
# Reader study, probing, alignment
# ----------------------------------------------------------------------------------------------
def _cmd_reader_export(args) -> int:
    from ZeroShotILDLib.pipeline import Analyzer, montage_for_scan
    from ZeroShotILDLib.scan import read_scan

    from . import reader_study

    base = settings_from_args(args)
    methods = {"random": dataclasses.replace(base, retrieval="random"), "clip": dataclasses.replace(base, retrieval="clip")}
    if args.dapt_model:
        methods["dapt-clip"] = dataclasses.replace(base, retrieval="clip", model=args.dapt_model, checkpoint=None)
    chosen = _csv_list(args.methods, what="--methods") or list(methods)
    unknown = [m for m in chosen if m not in methods]
    if unknown:
        raise InputError(f"--methods {','.join(unknown)}: use random, clip" + (", dapt-clip" if args.dapt_model else
                                                                             " (dapt-clip needs --dapt-model)"))
    records = _read_manifest(args.manifest)
    if args.split and any(r.split for r in records):
        records = [r for r in records if r.split == args.split]
    if not records:
        raise InputError(f"no rows with split {args.split!r} in the manifest")
    analyzers = {m: Analyzer(methods[m]) for m in chosen if methods[m].retrieval == "clip"}
    montages = {}
    for record in _bar(records, desc="montages", quiet=args.quiet):
        scan = read_scan(record.scan_path)
        for m in chosen:
            montages[(record.scan_id, m)], _ = montage_for_scan(scan, methods[m], analyzer=analyzers.get(m))
    with _staged_output(Path(args.out)) as tmp:
        written = reader_study.export_reader_study(montages, tmp, grid_n=base.montage_size,
                                                   readers=_csv_list(args.readers, what="--readers"),
                                                   blind=args.blind, seed=args.seed)
        groups = {r.scan_id: ("Positive" if r.ild == 1 else "Negative") for r in records if r.ild is not None}
        _write_json(tmp / "study.json", {"grid_n": base.montage_size, "methods": chosen, "groups": groups,
                                          "settings": base.to_dict()})
    print(f"{len(written['images'])} numbered montages and {len(written['sheets'])} count sheet(s) in {args.out}"
          + ("  (keep key.csv away from readers)" if args.blind else ""))
    return 0


def _cmd_reader_analyze(args) -> int:
    from . import plots, reader_study

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
    with _staged_output(Path(args.out)) as tmp:
        plots.write_grid_tables(rows, tmp / "reader_study", factors=["group", "method"],
                                metrics=("percent_ild", "icc3_1"), caption="Paper 000 Table 6: reader study",
                                bold_best=False)
    for r in rows:
        print(f"{r['group']} / {r['method']}: {r['percent_ild']:.1f} % ILD patches, ICC(3,1) {r['icc3_1']:.3f} "
              f"({r['n_readers']} readers, {r['n_scans']} scans)")
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

    records = _read_manifest(args.manifest)
    records = [r for r in records if r.ild is not None]
    if args.label == "subtype":
        classes = ["no ild"] + sorted({r.subtype.strip().lower() for r in records if r.subtype})
        label_of = lambda r: classes.index(r.subtype.strip().lower()) if r.subtype else (0 if r.ild == 0 else None)
    else:
        classes = ["no ild", "ild"]
        label_of = lambda r: int(r.ild)
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
    prototypes = np.stack([text.embed(c).numpy() for c in classes])
    zs = linear_probe.zero_shot_probabilities(xte, prototypes)
    result["zero_shot"] = linear_probe.classification_metrics(yte, zs)
    if base:
        result["base_new"] = linear_probe.base_new_report(
            xtr, ytr, xte, yte, prototypes, base_classes=[classes.index(b.lower()) for b in base], class_names=classes,
            k=args.k, seeds=seeds)
    with _staged_output(Path(args.out)) as tmp:
        _write_json(tmp / "probe.json", result)
    lp = result["linear_probe"]
    print(f"{args.k}-shot linear probe ({len(classes)} classes, {len(seeds)} draws): ACA {lp['aca_mean']:.3f} "
          f"± {lp['aca_std']:.3f}; zero-shot ACA {result['zero_shot'].get('aca', float('nan')):.3f}")
    return 0


def _cmd_alignment(args) -> int:
    from ZeroShotILDLib.models import load_model

    from . import alignment, reports

    records = _read_manifest(args.manifest, require_report=True)
    if args.split and any(r.split for r in records):
        records = [r for r in records if r.split == args.split]
    if not records:
        raise InputError(f"no rows with split {args.split!r} in the manifest")
    model = load_model(args.model, checkpoint=args.checkpoint, weights_dir=args.weights_dir, device=args.device)
    pairs, _ = _pairs(records, args.cache)
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


# ----------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="chexzero", help="registry name, dapt:<checkpoint> or a checkpoint path")
    p.add_argument("--checkpoint", help="weights file for a registry model")
    p.add_argument("--weights-dir", help="folder where registry weights are looked for")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from . import reports

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("split", help="assign train/val/test by patient (never by scan)")
    p.add_argument("manifest")
    p.add_argument("--out", required=True, help="manifest to write (.csv or .jsonl)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of patients for validation (paper 000: 0.1)")
    p.add_argument("--test-fraction", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("preprocess", help="cache one montage per scan (resumable, --shard i/N for job arrays)")
    p.add_argument("manifest")
    p.add_argument("--cache", required=True, help="output folder of the montages (one folder per montage setting)")
    p.add_argument("--shard", default="0/1", help="this job's part i/N of the scans (e.g. $SLURM_ARRAY_TASK_ID/16)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes")
    _add_settings_args(p)

    p = sub.add_parser("train", help="domain-adaptive pre-training (DAPT) on cached montages and reports")
    _add_training_args(p)

    p = sub.add_parser("sweep", help="one training run per learning rate, best by validation loss")
    _add_training_args(p)
    p.add_argument("--lrs", help="comma-separated learning rates (default: 5 log-spaced in [1e-5, 1e-3])")

    p = sub.add_parser("export", help="Lightning .ckpt -> engine checkpoint (safetensors)")
    p.add_argument("checkpoint", help="a run's checkpoints/last.ckpt")
    p.add_argument("--out", required=True, help="engine checkpoint to write (.safetensors)")
    g = p.add_argument_group("the run's settings (read from the run folder; give them for a .ckpt kept elsewhere)")
    g.add_argument("--model", help="base model the run trained (registry name, dapt:<checkpoint> or path)")
    g.add_argument("--base-checkpoint", help="weights file of that base model, if the run was given --checkpoint")
    g.add_argument("--weights-dir", help="folder where registry weights are looked for")
    g.add_argument("--loss", help="loss the run trained with (clip, relaxed, slip, uniclip, unicl, dlilp)")
    g.add_argument("--classes", help="comma-separated label classes of a unicl/dlilp run")

    for name, helptext in (("evaluate", "AUROC/AUPRC/F1 with bootstrap CIs, per subtype, ensembles, ROC/PR curves"),
                           ("grid", "retrieval x model x montage size x filter threshold (paper 000 tables)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("manifest", help="labelled manifest (ild column; split column to pick test/val rows)")
        p.add_argument("--out", required=True)
        p.add_argument("--split", default="test", help="rows to evaluate (default test; val rows set the F1 threshold)")
        p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
        _add_settings_args(p)
        if name == "evaluate":
            p.add_argument("--models", action="append", metavar="MODEL",
                           help="model to evaluate, repeatable (default --model); dapt:<ckpt> uses the DAPT model "
                           "to pick the patches and to classify (paper 000's best configuration)")
            p.add_argument("--ensemble", action="append", metavar="ENSEMBLE_JSON",
                           help="a run's ensemble.json: average the probabilities of its top-k checkpoints")
        else:
            p.add_argument("--retrievals", help="comma list of clip,random")
            p.add_argument("--models", help="comma list of models (registry names, dapt:<ckpt>)")
            p.add_argument("--montage-sizes", help="comma list of 4,8,16")
            p.add_argument("--filter-thresholds", help="comma list, e.g. 0.2,0.5,0.8")

    p = sub.add_parser("reader-study", help="numbered montages for readers and ICC(3,1) of their counts")
    rs = p.add_subparsers(dest="action", required=True)
    q = rs.add_parser("export", help="write numbered montages and blank count sheets")
    q.add_argument("manifest")
    q.add_argument("--out", required=True)
    q.add_argument("--methods", help="comma list of random,clip,dapt-clip (default: all available)")
    q.add_argument("--dapt-model", help="dapt:<ckpt> for the dapt-clip method")
    q.add_argument("--readers", help="comma list of reader codes (one sheet each)")
    q.add_argument("--blind", action="store_true", help="neutral image names, shuffled; key.csv maps them back")
    q.add_argument("--split", default="test", help="rows to export when the manifest has splits")
    _add_settings_args(q)
    q = rs.add_parser("analyze", help="read filled sheets, write paper 000 Table 6")
    q.add_argument("study", help="folder written by `reader-study export`")
    q.add_argument("sheets", nargs="+", help="filled count sheets (CSV)")
    q.add_argument("--out", required=True)
    q.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS)

    p = sub.add_parser("probe", help="paper 002: K-shot linear probing on frozen montage features, zero-shot, base/new")
    p.add_argument("manifest")
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--label", default="subtype", choices=["subtype", "ild"], help="classes: no ild + subtypes, or ild yes/no")
    p.add_argument("--k", type=int, default=16, help="cases per class (paper 002: 16)")
    p.add_argument("--repeats", type=int, default=5, help="K-shot draws (seeds)")
    p.add_argument("--base", help="comma list of base classes (seen in pre-training) for the base/new report")
    p.add_argument("--split", default="test", help="evaluation rows (train rows are probed on)")
    _add_model_args(p)

    p = sub.add_parser("alignment", help="paper 001: report- and sentence-level image-text cosine similarity")
    p.add_argument("manifest")
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--text", dest="text_choice", default="findings+impression", choices=reports.TEXT_CHOICES)
    p.add_argument("--split", default="test", help="rows to use when the manifest has splits")
    _add_model_args(p)
    _add_config_args(parser)
    return parser


#: Options every command takes from the top-level parser; never settings of a run.
_CONFIG_EXCLUDED = {"command", "action", "config", "print_config", "help"}


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
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"--config {file.name} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"--config {file.name} must be a mapping of settings (key: value), not {type(data).__name__}")
    keys = _settings_keys(command)
    unknown = sorted(str(k) for k in data if str(k) not in keys)
    if unknown:
        raise InputError(f"--config {file.name}: unknown settings for `{name}`: {', '.join(unknown)} "
                         f"(see `{PROG} {name} --print-config`)")
    return {keys[str(k)].dest: v for k, v in data.items()}


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
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s")
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
    progress = TqdmProgress(enabled=not args.quiet)
    try:
        if args.command == "split":
            return _cmd_split(args)
        if args.command == "preprocess":
            return _cmd_preprocess(args, progress)
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "sweep":
            return _cmd_sweep(args)
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "evaluate":
            return _cmd_evaluate(args)
        if args.command == "grid":
            return _cmd_grid(args)
        if args.command == "reader-study":
            return _cmd_reader_export(args) if args.action == "export" else _cmd_reader_analyze(args)
        if args.command == "probe":
            return _cmd_probe(args)
        return _cmd_alignment(args)
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


if __name__ == "__main__":
    sys.exit(main())
