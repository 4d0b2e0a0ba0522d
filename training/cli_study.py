"""``reader-study``, ``probe`` and ``alignment``: what readers see, linear probes and image-text alignment."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ZeroShotILDLib.errors import InputError

from ZeroShotILDLib.cli import settings_from_args

from .cli_common import PROG, _bar, _csv_list, _pairs, _read_manifest, _staged_output, _with_pixel_spacing, _write_json, log
from .cli_evaluate import _finish_failures
from .files import claim_out_dir


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
