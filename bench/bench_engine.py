"""Engine benchmark (issue 2): encoding throughput against the FLOP-bound limit, and re-prompt vs first run.

Everything is measured side by side in one run on this machine, so the ratios are what count:
- peak fp32 matrix-multiply throughput of this CPU (torch.mm on 2048^2 matrices), the FLOP-bound;
- FLOPs of one ViT-B/32 image encoding (torch's FlopCounterMode);
- patches encoded per second by the engine (patch extraction + encoding, default architecture with
  random weights) and its fraction of the FLOP-bound limit;
- a first ``analyze`` of a phantom vs a re-prompt on the same Analyzer (target: >= 50x faster).

    .venv/bin/python bench/bench_engine.py [--shape Z Y X] [--out bench/RESULTS.md]
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch


def peak_matmul_gflops(size: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * size ** 3 * reps / (time.perf_counter() - t) / 1e9


def vit_flops_per_image(model) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 3, model.image_size, model.image_size)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.model.encode_image(model.normalize(x))
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(60, 256, 256), help="phantom shape z y x")
    ap.add_argument("--spacing", type=float, nargs=3, default=(1.4, 1.4, 2.5), help="phantom spacing x y z (mm)")
    ap.add_argument("--patches", type=int, default=96, help="patches for the throughput measurement")
    ap.add_argument("--out", type=Path, help="append the results as Markdown to this file")
    args = ap.parse_args()

    from ZeroShotILDLib.embeddings import ImageEncoder
    from ZeroShotILDLib.lung_mask import segment_lungs
    from ZeroShotILDLib.models import load_model
    from ZeroShotILDLib.patches import candidates_for, iter_patch_batches
    from ZeroShotILDLib.phantom import generate_phantom
    from ZeroShotILDLib.pipeline import Analyzer
    from ZeroShotILDLib.scan import scan_from_array
    from ZeroShotILDLib.settings import AnalysisSettings

    phantom = generate_phantom(11, shape_zyx=tuple(args.shape), spacing_mm=tuple(args.spacing), ild=True)
    scan = scan_from_array(phantom.hu, phantom.spacing_mm, phantom.origin_mm, phantom.direction, source="phantom")
    # The exact mode is the reference: every candidate encoded at full resolution on the first run.
    settings = AnalysisSettings(model="vit-b-32-random", device="cpu", slice_step_mm=5.0, batch_size=32,
                                scoring_mode="exact")
    model = load_model(settings.model, device="cpu")

    peak = peak_matmul_gflops()
    flops = vit_flops_per_image(model)
    limit = peak * 1e9 / flops

    mask = segment_lungs(scan.hu, scan.spacing_mm, settings.lung)
    patches = candidates_for(mask, scan.spacing_mm, settings, scan.origin_mm, scan.direction)
    n = min(args.patches, len(patches))
    idx = np.random.default_rng(0).choice(len(patches), n, replace=False)
    enc = ImageEncoder(model, batch_size=32)
    enc.encode(torch.rand(4, 1, model.image_size, model.image_size))  # warm-up
    t = time.perf_counter()
    for _, px in iter_patch_batches(scan.hu, patches, idx, batch_size=32, image_size=model.image_size):
        enc.encode(px)
    rate = n / (time.perf_counter() - t)

    analyzer = Analyzer(settings, model=model)
    t = time.perf_counter()
    first = analyzer.analyze(scan)
    first_s = time.perf_counter() - t
    times = []
    for prompt in ("honeycombing", "ground-glass opacity", "reticulation"):
        t = time.perf_counter()
        analyzer.reprompt([prompt])
        times.append(time.perf_counter() - t)
    reprompt_s = float(np.median(times))

    rows = [
        ("machine", f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"),
        ("peak fp32 matmul", f"{peak:.1f} GFLOP/s"),
        ("ViT-B/32 FLOPs per image", f"{flops / 1e9:.2f} GFLOP"),
        ("FLOP-bound limit", f"{limit:.1f} patches/s"),
        ("engine throughput (extract + encode)", f"{rate:.1f} patches/s"),
        ("fraction of FLOP-bound limit", f"{rate / limit:.2f}"),
        ("phantom", f"{tuple(args.shape)} voxels, {len(first.patches)} candidates"),
        ("first analyze", f"{first_s:.2f} s"),
        ("re-prompt (median of 3)", f"{reprompt_s * 1000:.0f} ms"),
        ("re-prompt speed-up", f"{first_s / reprompt_s:.0f}x (target >= 50x)"),
    ]
    text = "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(text)
    if args.out:
        import sys

        command = "OMP_NUM_THREADS=2 .venv/bin/python bench/bench_engine.py " + " ".join(sys.argv[1:])
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(f"\n## Engine throughput and re-prompt (issue 2), {time.strftime('%Y-%m-%d')}\n\n"
                         f"`{command}`\n\n| measure | value |\n|---|---|\n{text}\n")


if __name__ == "__main__":
    main()
