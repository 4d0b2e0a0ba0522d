"""Fast mode's candidate search replayed offline (issue 13): how many of the exact top-16 each rule finds.

Fast mode without native bf16 encodes only some candidates exactly (``proposals``: a first pass on
slices some mm apart, then best-first on scores interpolated in z) and ranks on those. Whether it
finds the exact top-16 depends on the rule, the scan, the model and the prompt; timing every rule
end to end would take hours, so this bench separates the two:

1. ``--dump-dir DIR``: an exact analysis of each input with each model (real engine runs, minutes
   each; skipped when DIR already holds the file) saves every candidate's fp32 feature, the boxes and
   the text embeddings of ``PROMPTS``.
2. The rules are replayed on those features with the engine's own functions (``first_pass``,
   ``slice_neighbours``, ``interpolate_skipped``, ``next_to_encode``; for the bf16 path also
   ``neighbours_to_refine`` and ``select_for_rescoring``, with the fp32 features standing in for
   bf16 ones, so its figures are an upper bound). No model runs in this step.

Printed per rule: the least "kept" (exact top-16 found, of 16) over every prompt of every input, the
number of (input, prompt) pairs under 15/16, and the share of candidates encoded on the reference
(its time is about fixed costs + share x the exact encoding time; bench_speed.py measures it).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_fp32_search.py --dump-dir /tmp/fp32-search --out bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.markdown_report import emit  # noqa: E402

REAL_CT = REPO.parent / "shared" / "data" / "real" / "ct" / "totalseg"
#: The default prompt first, then user prompts a clinician would type.
PROMPTS = ("interstitial lung disease", "honeycombing", "ground-glass opacity", "emphysema", "reticulation",
           "traction bronchiectasis")
TOP = 16


def inputs() -> list:
    """(name, source) of the thin-slice inputs: the bench_speed phantoms (seed, shape) and the real 1.5 mm crops."""
    out = [(f"phantom{seed}", (seed, shape)) for seed, shape in ((11, (300, 512, 512)), (12, (100, 512, 512)),
                                                                (13, (100, 512, 512)))]
    out += [(p.name.replace(".nii.gz", ""), p) for p in (REAL_CT / "chest_crop_a.nii.gz", REAL_CT / "chest_crop_b.nii.gz")
            if p.exists()]
    return out


def dump(model_name: str, name: str, source, dump_dir: Path) -> Path:
    """Exact fp32 features of every candidate (the engine's exact mode) and the prompts' text pairs."""
    from ZeroShotILDLib.phantom import generate_phantom
    from ZeroShotILDLib.pipeline import Analyzer
    from ZeroShotILDLib.settings import AnalysisSettings

    target = dump_dir / f"{model_name}-{name}.npz"
    if target.exists():
        return target
    path = source
    if isinstance(source, tuple):  # a phantom, generated once (the same as bench_speed's)
        path = dump_dir / f"{name}.nii.gz"
        if not path.exists():
            seed, shape = source
            generate_phantom(seed, shape_zyx=shape, spacing_mm=(0.7, 0.7, 1.0), ild=True).save(path)
    settings = AnalysisSettings(model=model_name, montage_size=4, filter_threshold=0.5, top_k=TOP,
                                scoring_mode="exact").validate()
    analyzer = Analyzer(settings)
    t = time.perf_counter()
    analyzer.analyze(str(path))
    state = analyzer._state
    texts = {}
    for i, prompt in enumerate(PROMPTS):
        negative = AnalysisSettings(prompts=[prompt]).validate().negative_for(0)
        for k, v in enumerate(analyzer.text.pair(prompt, negative)):
            texts[f"text_{i}_{k}"] = np.asarray(v, np.float32)
    np.savez(target, features=state.features, slice_index=state.patches.slice_index, row0=state.patches.row0,
             col0=state.patches.col0, spacing=np.asarray(state.scan.spacing_mm, np.float64), **texts)
    print(f"  dumped {model_name} {name}: {len(state.patches)} candidates, {time.perf_counter() - t:.0f} s", flush=True)
    return target


def load(path: Path):
    import torch

    d = np.load(path)
    texts = [(torch.from_numpy(d[f"text_{i}_0"]), torch.from_numpy(d[f"text_{i}_1"])) for i in range(len(PROMPTS))]
    return d["features"], d["slice_index"], d["row0"], d["col0"], d["spacing"], texts


def exact_top(features, text) -> set:
    from ZeroShotILDLib.scoring import softmax_probability

    p = softmax_probability(features, *text)
    return set(np.lexsort((np.arange(p.size), -p))[:TOP].tolist())


def first_pass(features, si, r0, c0, spacing, skip_mm: float):
    """``Analyzer._embed``'s first pass: (slice step, neighbours, encoded rows, their features; zeros elsewhere)."""
    from ZeroShotILDLib import proposals as P
    from ZeroShotILDLib.patches import slice_step_voxels

    stride = slice_step_voxels(spacing, 1.0)
    step = P.proposal_slice_step(spacing[2] * stride, skip_mm)
    nb = P.slice_neighbours(si, r0, c0, step, stride)
    encoded = P.first_pass(si, nb, step, stride).copy()
    return step, nb, encoded, np.where(encoded[:, None], features, 0).astype(np.float32)


def _slices_to_encoded(encoded, si, nb) -> np.ndarray:
    """Distance in scan slices from each candidate to the nearest encoded box of its column (0 if encoded)."""
    z = si.astype(np.float64)
    out = np.zeros(encoded.size)
    skipped = np.flatnonzero(~encoded)
    nearest = np.full(skipped.size, np.inf)
    for k in range(nb.shape[1]):
        j = nb[skipped, k]
        ok = (j >= 0) & encoded[np.maximum(j, 0)]
        nearest = np.where(ok, np.minimum(nearest, np.abs(z[np.maximum(j, 0)] - z[skipped])), nearest)
    out[skipped] = nearest
    return out


def fp32_search(features, si, r0, c0, spacing, text, skip_mm: float, depth: int, batch: int, kappa: float = 0.0):
    """The fp32 path of ``Analyzer._embed``: first pass, then best-first until the best ``depth`` are encoded.

    ``kappa`` > 0 (not in the engine; tried here) ranks by an upper bound instead: score + kappa x the
    RMS interpolation error per slice of distance seen so far in this search x the distance to the
    nearest encoded box, so uncertain boxes are encoded before equally scored certain ones.
    """
    from ZeroShotILDLib import proposals as P
    from ZeroShotILDLib.scoring import softmax_probability

    _, nb, encoded, known = first_pass(features, si, r0, c0, spacing, skip_mm)
    errors, distances = [], []
    while True:
        scores = softmax_probability(P.interpolate_skipped(known, encoded, si, nb), *text)
        distance = _slices_to_encoded(encoded, si, nb) if kappa > 0 else None
        priority = scores
        if kappa > 0 and errors:
            per_slice = np.sqrt(np.mean((np.asarray(errors) / np.asarray(distances)) ** 2))
            priority = scores + kappa * per_slice * distance
        more = P.next_to_encode(priority, encoded, depth, batch)
        if not more.size:
            break
        if kappa > 0:
            errors += list(np.asarray(softmax_probability(features[more], *text)) - np.asarray(scores[more]))
            distances += list(distance[more])
        known[more] = features[more]
        encoded[more] = True
    scores = softmax_probability(P.interpolate_skipped(known, encoded, si, nb), *text)
    found = set(P.rank_exact_first(scores, encoded, TOP).tolist())
    return len(found & exact_top(features, text)), int(encoded.sum())


def bf16_path(features, si, r0, c0, spacing, text, skip_mm: float = 1.0):
    """The bf16 path with fp32 features as proposals: first pass, neighbours of the best, exact re-scoring."""
    from ZeroShotILDLib import proposals as P
    from ZeroShotILDLib.scoring import softmax_probability
    from ZeroShotILDLib.settings import AnalysisSettings

    d = AnalysisSettings()
    n = len(features)
    count = P.rescore_count(n, top_k=TOP, montage_patches=TOP, rescore_fraction=d.rescore_fraction,
                            rescore_min=d.rescore_min)
    step, nb, encoded, known = first_pass(features, si, r0, c0, spacing, skip_mm)
    if step > 1:
        more = P.neighbours_to_refine(softmax_probability(known, *text), encoded, nb, P.REFINE_PER_RESCORED * count)
        known[more] = features[more]
        encoded[more] = True
    ranking = P.interpolate_skipped(known, encoded, si, nb)
    exact = np.zeros(n, bool)
    exact[P.select_for_rescoring(softmax_probability(ranking, *text), count, exact)] = True
    ranking[exact] = features[exact]
    found = set(P.rank_exact_first(softmax_probability(ranking, *text), exact, TOP).tolist())
    # Proposal encodings at the bf16 rate plus the exact ones: reported as proposals + exact.
    return len(found & exact_top(features, text)), int(encoded.sum()) + int(exact.sum())


def main() -> None:
    from ZeroShotILDLib import proposals as P

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dump-dir", type=Path, required=True, help="where the exact features are kept (reused)")
    ap.add_argument("--models", nargs="+", default=["vit-b-32-random", "phantom-demo"])
    ap.add_argument("--inputs", nargs="+", help="only these inputs (e.g. phantom11 phantom12; default: all)")
    ap.add_argument("--rules", nargs="+", metavar="SKIP:DEPTH[:BATCH[:KAPPA]]",
                    help="fp32 rules to replay instead of the default grid (batch default 64, kappa 0)")
    ap.add_argument("--out", help="append the result as Markdown to this file")
    args = ap.parse_args()
    args.dump_dir.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M")
    data = {}
    for model in args.models:
        for name, source in inputs():
            if not args.inputs or name in args.inputs:
                data[(model, name)] = load(dump(model, name, source, args.dump_dir))
    from ZeroShotILDLib.settings import AnalysisSettings

    shipped = (AnalysisSettings().fp32_skip_within_mm, P.FP32_SEARCH_DEPTH_PER_TOP * TOP)
    if args.rules:
        rules = []
        for text in args.rules:
            parts = [float(v) for v in text.split(":")]
            rules.append(("fp32", parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else P.FP32_SEARCH_BATCH,
                          parts[3] if len(parts) > 3 else 0.0))
    else:
        rules = [("fp32", skip, depth, P.FP32_SEARCH_BATCH, 0.0) for skip in (1.0, 2.0, 4.0) for depth in (128, 256, 384)]
        rules.append(("bf16", 1.0, 0, 0, 0.0))
    lines = []
    for kind, skip, depth, batch, kappa in rules:
        kept, share, ref_kept = {m: [] for m in args.models}, {}, {}
        for (model, name), (F, si, r0, c0, sp, texts) in data.items():
            for text in texts:
                if kind == "fp32":
                    k, encoded = fp32_search(F, si, r0, c0, sp, text, skip, depth, batch, kappa)
                else:
                    k, encoded = bf16_path(F, si, r0, c0, sp, text, skip)
                kept[model].append(k)
                if name == "phantom11":
                    share.setdefault(model, []).append(encoded / len(F))
                    ref_kept.setdefault(model, []).append(k)
        label = (f"fp32 search: skipped slices within {skip:g} mm of an encoded one, then best-first to the best {depth}"
                 + (f", {batch} at a time" if batch != P.FP32_SEARCH_BATCH else "")
                 + (f", by score + {kappa:g} x its interpolation error bound" if kappa else "")
                 + (" **(shipped)**" if (skip, depth, batch, kappa) == (*shipped, P.FP32_SEARCH_BATCH, 0.0) else "")
                 if kind == "fp32" else
                 "bf16 path (fp32 features as proposals: an upper bound): skipped slices within 1 mm, neighbours, exact re-scoring")
        cells = []
        for m in args.models:
            cells += [f"{min(kept[m])} / {sum(k < 15 for k in kept[m])} of {len(kept[m])} / {np.mean(kept[m]):.2f}",
                      f"{' '.join(map(str, ref_kept.get(m, [])))} @ {np.mean(share.get(m, [np.nan])):.3f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    header = ["rule"] + [c for m in args.models for c in (f"{m}: least kept / pairs under 15 / mean kept", f"{m}: reference kept per prompt @ share encoded")]
    names = sorted({name for _, name in data})
    text = [
        f"\n## Fast mode's candidate search, replayed per prompt (issue 13), {started}\n",
        f"`OMP_NUM_THREADS=2 .venv/bin/python bench/bench_fp32_search.py {' '.join(sys.argv[1:])}`: exact fp32 features "
        f"of every candidate of {', '.join(names)} (engine exact mode, candidate slices 1 mm apart or every slice if thicker), each rule "
        f"replayed for {len(PROMPTS)} prompts ({'; '.join(PROMPTS)}). kept = exact top-{TOP} found.\n",
        "| " + " | ".join(header) + " |", "|---" * len(header) + "|", *lines, "",
    ]
    emit("\n".join(text), args.out)


if __name__ == "__main__":
    main()
