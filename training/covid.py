"""Real images and real text end to end: DAPT on the public COVID-CT figure crops and their captions.

The COVID-CT set (UCSD-AI4H) has 2-D CT slices cut from papers: ``CT_COVID`` (captions in
``COVID-CT-MetaInfo.csv`` for most of them) and ``CT_NonCOVID`` (no text). This module

1. reads the folder into manifest records (image, caption, covid label, patient id) and splits
   them by patient into train / val / test (``manifest.split_by_patient``);
2. caches the montages of the captioned training images with the DAPT preprocessing
   (``preprocess.preprocess``: each PNG becomes a one-slice scan, lungs segmented on it or the
   whole image taken when none are found, random retrieval, 4 x 4 montage);
3. runs DAPT (``dapt.fit``, CLIP loss, three caption sentences sampled per step) from a base model;
4. scores every held-out test image, COVID and non-COVID, zero-shot with the engine's pipeline
   (the model picks the patches and classifies the montage, prompt vs ``no {prompt}``) and
   reports AUROC with bootstrap 95 % CIs for the base model, the DAPT model and, as the floor, the
   same architecture with random weights.

Only aggregate numbers are printed or written; captions and per-image outputs never are.

    python -m zeroshot_ild_train.covid --data ../shared/data/real/pairs/covid_ct --out /tmp/covid_run
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import csv
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ZeroShotILDLib.errors import InputError
from ZeroShotILDLib.settings import AnalysisSettings

from .manifest import ManifestRecord, split_by_patient

DEFAULT_PROMPTS = ("COVID-19 pneumonia", "ground glass opacity")


def clean_caption(text: str) -> str:
    """A caption cell as plain text: the set stores some as a Python list literal of strings."""
    text = (text or "").strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            parts = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parts = None
        if isinstance(parts, (list, tuple)):
            text = " ".join(str(p) for p in parts)
    return " ".join(text.split())


def _stem(name: str) -> str:
    """The key of an image name: no extension, no ``%k`` sub-figure suffix (``p3-89%0.png`` -> ``p3-89``)."""
    name = name.strip()
    for ext in (".png", ".jpg", ".jpeg"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
    return name.split("%")[0]


def _files_by_stem(folder: Path) -> dict:
    """stem -> image files; the metadata names some images without extension or sub-figure suffix."""
    out: dict = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else ():
        out.setdefault(_stem(path.name), []).append(path)
    return out


def read_covid_ct(folder) -> list:
    """Manifest records of every image: caption (COVID only), ``labels={"covid": 0/1}``, patient id."""
    folder = Path(folder)
    covid_csv, noncovid_csv = folder / "COVID-CT-MetaInfo.csv", folder / "NonCOVID-CT-MetaInfo.csv"
    if not covid_csv.is_file() or not noncovid_csv.is_file():
        raise InputError(f"{folder} is not the COVID-CT folder (COVID-CT-MetaInfo.csv missing): check --data")
    records, seen = [], set()
    covid_files = _files_by_stem(folder / "CT_COVID")
    with open(covid_csv, encoding="utf-8", errors="replace", newline="") as handle:
        for i, row in enumerate(csv.DictReader(handle)):
            caption = clean_caption(row.get("Captions", ""))
            name = row["File name"].strip()
            exact = [folder / "CT_COVID" / n for n in (name, name + ".png", name + ".jpg")
                     if (folder / "CT_COVID" / n).is_file()]
            for path in exact[:1] or covid_files.get(_stem(name), ()):
                if f"covid/{path.name}" in seen:
                    continue
                seen.add(f"covid/{path.name}")
                records.append(ManifestRecord(scan_path=path, scan_id=f"covid/{path.name}", report_text=caption or None,
                                              labels={"covid": 1}, patient_id=f"covid/{row['Patient ID'].strip()}",
                                              source=f"COVID-CT-MetaInfo.csv line {i + 2}"))
    with open(noncovid_csv, encoding="utf-8", errors="replace", newline="") as handle:
        for i, row in enumerate(csv.DictReader(handle)):
            path = folder / "CT_NonCOVID" / row["image name"].strip()
            if not path.is_file():
                continue
            records.append(ManifestRecord(scan_path=path, scan_id=f"noncovid/{path.name}", labels={"covid": 0},
                                          patient_id=f"noncovid/{row['patient id'].strip()}",
                                          source=f"NonCOVID-CT-MetaInfo.csv line {i + 2}"))
    if not records:
        raise InputError(f"no images found under {folder}: check --data")
    return records


def image_scans(records: Sequence[ManifestRecord], settings: AnalysisSettings) -> list:
    """(scan, lung mask) per image, computed once and shared by every model scored."""
    from ZeroShotILDLib.lung_mask import segment_lungs

    from .preprocess import image_as_scan

    out = []
    for r in records:
        scan = image_as_scan(r.scan_path, settings.hu_window).scan()
        try:
            mask = segment_lungs(scan.hu, scan.spacing_mm, settings.lung)
        except InputError:
            mask = np.ones(scan.hu.shape, dtype=bool)  # a figure crop without recognisable lungs
        out.append((scan, mask))
    return out


def score_images(model: str, scans: Sequence[tuple], prompts: Sequence[str], *, progress: bool = True) -> dict:
    """{prompt: P(prompt) per (scan, lung mask)} with the engine's default pipeline on one-slice scans."""
    from tqdm import tqdm

    from ZeroShotILDLib.pipeline import Analyzer

    settings = AnalysisSettings(model=model, device="cpu", prompts=list(prompts), subtypes=[]).validate()
    analyzer = Analyzer(settings)
    out = {p: [] for p in prompts}
    for scan, mask in tqdm(scans, desc=f"scoring {Path(model).name}", disable=not progress, file=sys.stderr):
        result = analyzer.analyze(scan, lung_mask=mask)
        for p in prompts:
            out[p].append(float(result.finding_probabilities[p]))
    return out


def run(data, out_dir, *, base_model: str, max_steps: int = 150, batch_size: int = 32, learning_rate: float = 1e-4,
        prompts: Sequence[str] = DEFAULT_PROMPTS, seed: int = 0, max_test_images: Optional[int] = None,
        compare_base: bool = False, progress: bool = True, monitor: str = "val_loss") -> dict:
    """Split, preprocess, DAPT, zero-shot test; returns the aggregate results (also ``results.json``)."""
    from . import dapt, preprocess
    from .data import pairs_from_manifest
    from .metrics import bootstrap_ci, roc_auc

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = split_by_patient(read_covid_ct(data), val_fraction=0.1, test_fraction=0.3, seed=seed)
    train_val = [r for r in records if r.split in ("train", "val") and r.report_text]
    # Validation images without a caption (all non-COVID) feed the zero-shot AUROC logged at every
    # validation (and --monitor val_auroc); the loss uses the captioned pairs only.
    train_val += [r for r in records if r.split == "val" and not r.report_text]
    test = [r for r in records if r.split == "test"]
    held_out = (len(test), len({r.patient_key for r in test}))
    if max_test_images and len(test) > max_test_images:
        # A seeded draw, half from each class, of the patient-held-out test images (CPU budget).
        rng = np.random.default_rng(seed)
        chosen = []
        for label in (1, 0):
            pool = [i for i, r in enumerate(test) if r.labels["covid"] == label]
            chosen += list(rng.choice(pool, size=min(len(pool), max_test_images // 2), replace=False))
        test = [test[i] for i in sorted(chosen)]
    settings = AnalysisSettings(model=base_model, retrieval="random", seed=seed, device="cpu").validate()
    summary = preprocess.preprocess(train_val, out_dir / "montages", settings, workers=1)
    montages = preprocess.finished_montages(train_val, out_dir / "montages", settings)
    kept = [r for r in train_val if r.scan_id in montages]
    pairs = pairs_from_manifest(kept, montages, class_names=(), label="covid")
    train = [p for p in pairs if p.split == "train"]
    val = [p for p in pairs if p.split == "val"]
    config = dapt.DaptConfig(output_dir=str(out_dir / "dapt"), model=base_model, loss="clip", text_choice="full",
                             sentences_per_sample=3, monitor=monitor, val_label="covid", val_prompt=prompts[0],
                             montage_settings=dataclasses.replace(settings, prompts=[prompts[0]]).to_dict(), batch_size=batch_size, learning_rate=learning_rate,
                             warmup_steps=min(20, max_steps // 5), max_steps=max_steps, max_epochs=1000,
                             val_every_steps=max(25, max_steps // 3), top_k=1, accelerator="cpu", precision="32-true",
                             num_workers=0, seed=seed, progress_bar=progress)
    fit = dapt.fit(config, pairs, train_records=train, val_records=val,
                   resume=(out_dir / "dapt" / "checkpoints" / dapt.RESUME_NAME).exists())
    trained = fit.best_checkpoint or fit.last_checkpoint

    y = np.array([r.labels["covid"] for r in test])
    models = {"untrained (same architecture, random weights)": _random_init(base_model, out_dir / "random_init.safetensors")}
    if compare_base:
        models["base (before DAPT)"] = base_model
    models["DAPT on COVID-CT captions"] = f"dapt:{trained}"
    scans = image_scans(test, settings)
    results = {"data": {"images": len(records), "captioned_train_pairs": len(train),
                        "val_pairs": sum(1 for p in val if p.report), "val_images_auroc_only": sum(1 for p in val if not p.report),
                        "test_images_held_out": held_out[0], "test_patients_held_out": held_out[1],
                        "test_images_scored": len(test), "test_covid": int(y.sum()),
                        "test_patients": len({r.patient_key for r in test}),
                        "preprocess_failed": len(summary.failed)},
               "dapt": {"steps": fit.global_step, "best_val_loss": fit.best_val_loss, "loss": config.loss,
                        "monitor": monitor, "best_score": fit.best_score,
                        "collapsed": fit.health.get("collapsed"), "at_chance": fit.health.get("at_chance"),
                        "initial_val": fit.health.get("initial"), "last_val": fit.health.get("last"),
                        "warning": fit.health.get("warning"),
                        "batch_size": batch_size, "learning_rate": learning_rate, "base_model": base_model},
               "auroc": {}}
    for name, model in models.items():
        scores = score_images(model, scans, prompts, progress=progress)
        results["auroc"][name] = {}
        for p in prompts:
            est = bootstrap_ci(roc_auc, y, np.array(scores[p]), seed=0)
            results["auroc"][name][p] = {"auroc": est.value, "ci95": [est.ci_low, est.ci_high]}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    return results


def _random_init(base_model: str, path: Path) -> str:
    """The base model's architecture with (seeded) random weights, as an engine checkpoint."""
    import torch

    from ZeroShotILDLib import models

    loaded = models.load_model(base_model, device="cpu")
    spec = models.ModelSpec(name="random-init", architecture=loaded.spec.architecture, quick_gelu=loaded.spec.quick_gelu,
                            source="random", image_mean=loaded.spec.image_mean, image_std=loaded.spec.image_std,
                            model_cfg=loaded.spec.model_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _ = models._build(spec)
    models.save_checkpoint(path, model, spec)
    return f"dapt:{path}"


def markdown(results: dict) -> str:
    prompts = list(next(iter(results["auroc"].values())))
    lines = ["| model | " + " | ".join(f"AUROC '{p}' (95 % CI)" for p in prompts) + " |",
             "|---" * (len(prompts) + 1) + "|"]
    for name, per in results["auroc"].items():
        cells = [f"{per[p]['auroc']:.3f} [{per[p]['ci95'][0]:.3f}, {per[p]['ci95'][1]:.3f}]" for p in prompts]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_manifest_only(data, out: Path, fov_mm: float = 0.0) -> int:
    """The folder as a manifest for the ``zeroshot-ild-train`` recipe (README); counts only are printed.

    The figure crops carry no pixel size. With ``fov_mm`` each row gets ``pixel_spacing_mm`` =
    ``fov_mm`` / the image's larger side (an assumed field of view, so a small and a large crop of
    a chest give patches of similar anatomy); without it the commands assume 1 mm per pixel and say so.
    """
    import dataclasses

    from PIL import Image

    from ZeroShotILDLib.atomic_files import atomic_path

    from .manifest import write_manifest

    try:
        records = read_covid_ct(Path(data).expanduser().resolve())  # absolute: the manifest may live anywhere
    except InputError as exc:
        print(f"covid: error: {exc}", file=sys.stderr)
        return 2
    if fov_mm:
        sized = []
        for r in records:
            with Image.open(r.scan_path) as im:  # the header only
                sized.append(dataclasses.replace(r, pixel_spacing_mm=round(fov_mm / max(im.size), 4)))
        records = sized
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        staged = tmp.with_name(tmp.name + out.suffix)  # write_manifest picks the format by the suffix
        try:
            write_manifest(records, staged)
            staged.replace(tmp)
        finally:
            staged.unlink(missing_ok=True)
    covid = sum(r.labels.get("covid") == 1 for r in records)
    captioned = sum(r.report_text is not None for r in records)
    print(f"{len(records)} images ({covid} COVID, {len(records) - covid} non-COVID; {captioned} with a caption), "
          f"{len({r.patient_id for r in records})} patients -> {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zeroshot_ild_train.covid", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the covid_ct folder")
    p.add_argument("--out", help="work folder (montages, DAPT run, results.json); keep it out of git")
    p.add_argument("--write-manifest", metavar="CSV",
                   help="only write a zeroshot-ild-train manifest of every image (caption as report_text, "
                        "label_covid, patient_id) and stop")
    p.add_argument("--fov-mm", type=float, default=0.0,
                   help="with --write-manifest: assumed field of view of each crop (e.g. 350): pixel_spacing_mm = "
                        "FOV / larger side; default none (the commands then assume 1 mm per pixel and warn)")
    p.add_argument("--base-model", default="phantom-demo")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-test-images", type=int, help="score a seeded, class-balanced draw of this many test images")
    p.add_argument("--compare-base", action="store_true", help="also score the base model before DAPT")
    p.add_argument("--monitor", default="val_loss", choices=("val_loss", "val_auroc"),
                   help="checkpoint criterion (val_auroc: zero-shot AUROC of the validation images, first prompt)")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.write_manifest:
        return _write_manifest_only(args.data, Path(args.write_manifest), args.fov_mm)
    if not args.out:
        p.error("--out is required (or give --write-manifest)")
    try:
        results = run(args.data, args.out, base_model=args.base_model, max_steps=args.steps, batch_size=args.batch_size,
                      learning_rate=args.lr, seed=args.seed, max_test_images=args.max_test_images,
                      compare_base=args.compare_base, progress=not args.quiet, monitor=args.monitor)
    except InputError as exc:
        print(f"covid: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(results["data"]))
    print(json.dumps(results["dapt"]))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
