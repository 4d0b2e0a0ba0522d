"""``split``, ``preprocess``, ``preview-text`` and ``runs``: the cohort commands around training."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ZeroShotILDLib.cli import EXIT_PARTIAL, settings_from_args
from ZeroShotILDLib.errors import InputError
from ZeroShotILDLib.settings import AnalysisSettings

from .cli_common import CACHE_SETTINGS, _read_manifest, _with_pixel_spacing, log
from .files import atomic_write_text


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

