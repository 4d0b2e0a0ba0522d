"""Extent benchmark (issue 14): extent of "interstitial lung disease" vs the phantoms' ground-truth disease masks.

For each phantom of a fresh cohort (seeds never used to train phantom-demo) the engine runs with its
own lung segmentation and the phantom-demo model; the extent (``extent.py``'s rule) is compared with
the true share of the lung inside ``Phantom.disease_mask``, measured by the same zones on the true
lung mask:

- Spearman correlation of extent vs truth (all scans; ILD scans only);
- basal predominance: sign of (lower - upper) agrees with the truth's, on ILD scans (IPF and SSc are
  basal, HP upper-zone in the phantom);
- subpleural predominance: sign of (subpleural - central) agrees with the truth's, on ILD scans
  (IPF subpleural, SSc with subpleural sparing);
- normal lungs: extent on the normal phantoms (should be low);

for the engine's rule (per-scan reference and, for phantom-demo, the shipped normal-lung reference)
and, in the same run on the same probabilities, the per-scan reference alone and a fixed cut p > 0.5.

``--calibrate`` first writes phantom-demo's normal-lung reference for the prompt into
``ZeroShotILDLib/extent_calibration.json`` from normal phantoms of another cohort seed (4242 by
default; never the evaluation cohort).

    python bench/bench_extent.py [--phantoms 30] [--calibrate] [--out bench/RESULTS.md]
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.markdown_report import emit  # noqa: E402


def sign_agrees(pred: float, truth: float) -> bool:
    return bool(np.sign(pred) == np.sign(truth))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phantoms", type=int, default=24)
    ap.add_argument("--seed", type=int, default=777, help="cohort seed (777: never used in training)")
    ap.add_argument("--shape", type=int, nargs=3, default=(48, 128, 128), help="phantom shape z y x")
    ap.add_argument("--spacing", type=float, default=2.5, help="isotropic phantom spacing (mm)")
    ap.add_argument("--out", type=Path, help="append the results as Markdown to this file")
    ap.add_argument("--calibrate", action="store_true", help="(re)write the normal-lung reference first")
    ap.add_argument("--calibration-phantoms", type=int, default=12)
    ap.add_argument("--calibration-seed", type=int, default=4242)
    args = ap.parse_args()

    from scipy.stats import spearmanr

    from ZeroShotILDLib import extent as ex
    from ZeroShotILDLib.phantom import generate_cohort
    from ZeroShotILDLib.patterns import pattern_map
    from ZeroShotILDLib.pipeline import Analyzer
    from ZeroShotILDLib.settings import DEFAULT_PATTERNS
    from ZeroShotILDLib.scan import scan_from_array
    from ZeroShotILDLib.settings import AnalysisSettings

    settings = AnalysisSettings(model="phantom-demo", scoring_mode="exact", subtypes=[], patterns=[])
    analyzer = Analyzer(settings)
    prompt = settings.prompts[0]
    geometry = dict(shape_zyx=tuple(args.shape), spacing_mm=(args.spacing,) * 3)
    if args.calibrate:
        calibrate_into_package(analyzer, prompt, args, geometry)
    reference = ex.normal_reference(settings.model, prompt)
    k = settings.extent_z
    rules = {f"engine: per-scan reference{' + shipped normal reference' if reference else ''}, z > {k:g}":
             lambda p: ex.positive_patches(p, k, reference),
             f"per-scan reference alone, z > {k:g}": lambda p: ex.positive_patches(p, k),
             "fixed cut p > 0.5 (zero-shot argmax)": lambda p: np.asarray(p) > 0.5}
    rows = []
    t0 = time.perf_counter()
    cohort = generate_cohort(args.phantoms, seed=args.seed, **geometry)
    for ph in cohort:
        scan = scan_from_array(ph.hu, ph.spacing_mm, ph.origin_mm, ph.direction, source="phantom")
        result = analyzer.analyze(scan)
        table = analyzer._state.zone_table
        probs = result.patch_probabilities[settings.prompts[0]]
        true_zones = ex.lung_zones(ph.lung_mask, ph.spacing_mm, ph.origin_mm, ph.direction,
                                   rind_mm=settings.subpleural_mm)
        truth, truth_zone = ex.truth_extent(true_zones.codes, ph.disease_mask, ph.spacing_mm)
        pred = {name: ex.zone_fractions(table, rule(probs))[:2] for name, rule in rules.items()}
        # Pattern map on the same kept embeddings (text only), against the disease mask box by box.
        pmap = pattern_map(analyzer._state.features, analyzer.text, DEFAULT_PATTERNS, settings.normal_prompt,
                           settings.extent_z)
        on_disease = box_disease_share(result.patches, ph.disease_mask) >= 0.1
        labelled = pmap.labels > 0
        rows.append({"subtype": ph.labels["subtype"] or "normal", "truth": truth, "truth_zone": truth_zone,
                     "pred": pred, "predominance": result.extent[settings.prompts[0]]["predominance"],
                     "labelled": ex.zone_fractions(table, labelled)[0], "labelled_on_disease": on_disease[labelled],
                     "labels": pmap.labels[labelled], "drawn": ph.labels["patterns"]})
    elapsed = time.perf_counter() - t0

    ild = [r for r in rows if r["subtype"] != "normal"]
    normal = [r for r in rows if r["subtype"] == "normal"]
    lines = [f"\n## Extent vs ground truth on phantoms (issue 14) — {time.strftime('%Y-%m-%d')}\n",
             f"    python bench/bench_extent.py --phantoms {args.phantoms} --seed {args.seed} "
             f"--shape {' '.join(map(str, args.shape))} --spacing {args.spacing:g}"
             + (f" --calibrate --calibration-phantoms {args.calibration_phantoms} --calibration-seed "
                f"{args.calibration_seed}" if args.calibrate else "")
             + (f" --out {args.out}" if args.out else "") + "\n",
             f"{len(rows)} phantoms (cohort seed {args.seed}, never used in training: {len(ild)} ILD — "
             + ", ".join(f"{sum(r['subtype'] == s for r in ild)} {s}" for s in sorted({r['subtype'] for r in ild}))
             + f" — and {len(normal)} normal), {tuple(args.shape)} at {args.spacing:g} mm; model phantom-demo, "
             f"prompt '{settings.prompts[0]}', exact mode, the engine's own lung mask; truth = share of the true "
             f"lung inside `disease_mask`, by the same zones ({settings.subpleural_mm:g} mm rind). "
             f"Predominance: the sign of (lower − upper) and of (subpleural − central) agrees with the truth's, "
             f"on the ILD phantoms. {elapsed:.0f} s on {platform.processor() or platform.machine()} "
             "(2 shared cores). "
             + (f"Normal-lung reference: {reference['scans']} normal phantoms ({reference['patches']} patches), "
                f"centre {reference['centre']:.4f}, spread {reference['spread']:.4f} (logit units).\n"
                if reference else "No normal-lung reference shipped: the per-scan rule alone.\n"),
             "| positive rule | Spearman, all scans | Spearman, ILD only | basal vs upper agrees | "
             "subpleural vs central agrees | extent, normal lungs: mean (max) | extent, ILD: mean (truth mean) |",
             "|---|---|---|---|---|---|---|"]
    truth_all = [r["truth"] for r in rows]
    for name in rules:
        frac = [r["pred"][name][0] for r in rows]
        rho_all = spearmanr(frac, truth_all).statistic
        rho_ild = spearmanr([r["pred"][name][0] for r in ild], [r["truth"] for r in ild]).statistic
        basal = np.mean([sign_agrees(r["pred"][name][1]["lower"] - r["pred"][name][1]["upper"],
                                     r["truth_zone"]["lower"] - r["truth_zone"]["upper"]) for r in ild])
        sub = np.mean([sign_agrees(r["pred"][name][1]["subpleural"] - r["pred"][name][1]["central"],
                                   r["truth_zone"]["subpleural"] - r["truth_zone"]["central"]) for r in ild])
        nf = [r["pred"][name][0] for r in normal]
        lines.append(f"| {name} | {rho_all:.2f} | {rho_ild:.2f} | {100 * basal:.0f} % | {100 * sub:.0f} % | "
                     f"{100 * np.mean(nf):.1f} % ({100 * np.max(nf):.1f} %) | "
                     f"{100 * np.mean([r['pred'][name][0] for r in ild]):.1f} % "
                     f"({100 * np.mean([r['truth'] for r in ild]):.1f} %) |")
    lines.append("\nPer subtype, default rule (mean extent; predominance lines as written in result.json):\n")
    lines.append("| subtype | n | truth | extent | truth lower / upper | extent lower / upper | "
                 "truth subpleural / central | extent subpleural / central | predominance lines |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    default = next(iter(rules))
    for sub_name in sorted({r["subtype"] for r in rows}):
        group = [r for r in rows if r["subtype"] == sub_name]

        def m(get):
            return 100 * float(np.nanmean([get(r) for r in group]))

        def pair(zones, a, b):
            return f"{m(lambda r: zones(r)[a]):.0f} / {m(lambda r: zones(r)[b]):.0f} %"

        def truth_zones(r):
            return r["truth_zone"]

        def pred_zones(r):
            return r["pred"][default][1]

        lines.append(
            f"| {sub_name} | {len(group)} | {m(lambda r: r['truth']):.1f} % | "
            f"{m(lambda r: r['pred'][default][0]):.1f} % | "
            f"{pair(truth_zones, 'lower', 'upper')} | {pair(pred_zones, 'lower', 'upper')} | "
            f"{pair(truth_zones, 'subpleural', 'central')} | {pair(pred_zones, 'subpleural', 'central')} | "
            + "; ".join(sorted({r["predominance"] for r in group})) + " |")
    lines += ["\nPattern map (default prompts " + ", ".join(f"'{p}'" for p in DEFAULT_PATTERNS)
              + f" vs '{settings.normal_prompt}', same embeddings): share of the scored lung labelled with any "
              "pattern, and of the labelled boxes those with >= 10 % of their lung on the disease mask:\n",
              "| subtype | labelled lung: mean | labelled boxes on disease | most frequent label (patches) | "
              "patterns drawn in the phantoms |", "|---|---|---|---|---|"]
    for sub_name in sorted({r["subtype"] for r in rows}):
        group = [r for r in rows if r["subtype"] == sub_name]
        hits = np.concatenate([r["labelled_on_disease"] for r in group])
        labels = np.concatenate([r["labels"] for r in group]).astype(int)
        counts = np.bincount(labels, minlength=len(DEFAULT_PATTERNS) + 1)[1:]
        top = (f"{DEFAULT_PATTERNS[int(np.argmax(counts))]} ({int(counts.max())} of {labels.size})"
               if labels.size else "none")
        drawn = sorted({p for r in group for p in r["drawn"]})
        lines.append(f"| {sub_name} | {100 * np.mean([r['labelled'] for r in group]):.1f} % | "
                     + (f"{100 * hits.mean():.0f} % of {hits.size}" if hits.size else "-")
                     + f" | {top} | {', '.join(drawn) or '-'} |")
    emit("\n".join(lines), args.out)


def box_disease_share(patches, disease_mask) -> np.ndarray:
    """Share of each candidate box (on its own slice) inside the ground-truth disease mask."""
    out = np.empty(len(patches))
    for i in range(len(patches)):
        z, r, c = int(patches.slice_index[i]), int(patches.row0[i]), int(patches.col0[i])
        out[i] = disease_mask[z, r:r + patches.size_rows, c:c + patches.size_cols].mean()
    return out


def calibrate_into_package(analyzer, prompt: str, args, geometry: dict) -> None:
    """Write the model's normal-lung margin reference for ``prompt`` into the package's calibration file."""
    import json

    from ZeroShotILDLib import extent as ex
    from ZeroShotILDLib.atomic_files import atomic_write_text
    from ZeroShotILDLib.phantom import generate_cohort
    from ZeroShotILDLib.scan import scan_from_array

    probabilities = []
    for ph in generate_cohort(args.calibration_phantoms, seed=args.calibration_seed, positive_fraction=0.0,
                              **geometry):
        scan = scan_from_array(ph.hu, ph.spacing_mm, ph.origin_mm, ph.direction, source="phantom")
        probabilities.append(analyzer.analyze(scan).patch_probabilities[prompt])
    ref = ex.calibrate(probabilities)
    ref["made_by"] = (f"python bench/bench_extent.py --calibrate --calibration-phantoms {args.calibration_phantoms} "
                      f"--calibration-seed {args.calibration_seed} --shape {' '.join(map(str, args.shape))} "
                      f"--spacing {args.spacing:g}")
    try:
        doc = json.loads(ex.CALIBRATION_PATH.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        doc = {}
    doc["format"] = "zeroshot-ild-extent-calibration/1"
    doc["note"] = ("normal-lung reference of each model's prompt margin logit(p), pooled over normal scans: "
                   "centre = median, spread = 1.4826 x MAD (extent.normal_reference)")
    doc.setdefault("models", {}).setdefault(analyzer.settings.model, {})[prompt] = ref
    atomic_write_text(ex.CALIBRATION_PATH, json.dumps(doc, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
