"""``evaluate`` and ``grid``: engine scores of labelled scans, AUROC/AUPRC/F1/MCC with bootstrap CIs, tables and curves."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ZeroShotILDLib.cli import EXIT_PARTIAL, settings_from_args
from ZeroShotILDLib.errors import InputError
from ZeroShotILDLib.settings import AnalysisSettings

from .cli_common import (PROG, SCORE_CACHE, _bar, _csv_list, _read_manifest, _staged_output, _with_pixel_spacing,
                         _write_json, _write_rows, log)
from .files import atomic_write_text, claim_out_dir


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
