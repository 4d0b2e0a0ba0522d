"""Data path vs synthetic encoding throughput (issue 5): does patch preparation keep the encoder fed?

Side by side in one process, on one device, with the same ImageEncoder (same batch size and
precision: autocast on CUDA, fp32 on CPU):

- synthetic: random [0, 1] pixels made once and already on the device, encoded batch after batch
  (the encoder's own ceiling on this device);
- engine: the candidates of a phantom encoded the way ``analyze`` encodes them: the volume put on
  the device (pinned upload on CUDA), boxes cut, windowed, resized and normalised per batch, encoded;
- their ratio (the issue's GPU target is >= 0.5).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_data_path.py --out bench/RESULTS.md          # CPU, 512 patches
    python bench/bench_data_path.py --device cuda --end-to-end --out bench/RESULTS.md          # GPU, every candidate

``--end-to-end`` also times one ``analyze()`` of the phantom held in memory, stage by stage, so a
machine without SimpleITK (the device machine) can run it; reading and writing NIfTI take ~2 s of
the CPU bench's end-to-end time.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.markdown_report import emit  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    from ZeroShotILDLib.lung_mask import segment_lungs
    from ZeroShotILDLib.patches import candidates_for, iter_patch_batches
    from ZeroShotILDLib.phantom import generate_phantom
    from ZeroShotILDLib.pipeline import Analyzer
    from ZeroShotILDLib.scan import scan_from_array
    from ZeroShotILDLib.settings import AnalysisSettings

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), help="phantom z y x")
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.7, 0.7, 1.0), help="phantom spacing x y z (mm)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--model", default="vit-b-32-random")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--batch-size", type=int, default=None, help="default: the engine's")
    ap.add_argument("--limit", type=int, default=None,
                    help="encode this many candidates (default: all on a GPU, 512 on a CPU)")
    ap.add_argument("--repeats", type=int, default=2, help="each side is timed this often, alternating; best kept")
    ap.add_argument("--end-to-end", action="store_true",
                    help="also time a whole analyze() of the phantom in memory (no file read or write), by stage")
    ap.add_argument("--gpu-memory", action="store_true",
                    help="on CUDA, also report the peak GPU memory (allocator peak and reserved) of the whole run")
    ap.add_argument("--out", help="append the result as Markdown to this file")
    args = ap.parse_args()

    overrides = {"batch_size": args.batch_size} if args.batch_size else {}
    settings = AnalysisSettings(model=args.model, device=args.device, scoring_mode="exact", **overrides).validate()
    analyzer = Analyzer(settings)
    model, encoder = analyzer.model, analyzer.encoder
    device = model.device
    limit = args.limit if args.limit is not None else (0 if device.type == "cuda" else 512)

    ph = generate_phantom(args.seed, shape_zyx=tuple(args.shape), spacing_mm=tuple(args.spacing), ild=True)
    mask = segment_lungs(ph.hu, ph.spacing_mm, settings.lung)
    patches = candidates_for(mask, ph.spacing_mm, settings)
    rng = np.random.default_rng(0)
    n = len(patches) if not limit or limit >= len(patches) else limit
    indices = np.sort(rng.choice(len(patches), size=n, replace=False))
    size = model.image_size

    def engine() -> float:
        _sync(device)
        t = time.perf_counter()
        volume = analyzer._device_volume(ph.hu)  # the upload is part of the data path
        batches = iter_patch_batches(volume, patches, indices, batch_size=encoder.batch_size, image_size=size,
                                     hu_window=settings.hu_window, device=device)
        encoder.encode_batches(batches, n)
        _sync(device)
        return time.perf_counter() - t

    synthetic_pixels = torch.rand(encoder.batch_size, 1, size, size, device=device)

    def synthetic() -> float:
        _sync(device)
        t = time.perf_counter()
        done = 0
        while done < n:
            b = min(encoder.batch_size, n - done)
            encoder._forward(synthetic_pixels[:b])  # features stay on the device: no copy back
            done += b
        _sync(device)
        return time.perf_counter() - t

    encoder._forward(synthetic_pixels)  # warm-up: kernels, autocast caches, allocator
    times = {"synthetic": [], "engine": []}
    for _ in range(args.repeats):
        times["synthetic"].append(synthetic())
        times["engine"].append(engine())
    rate = {k: n / min(v) for k, v in times.items()}
    ratio = rate["engine"] / rate["synthetic"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [
        f"\n## Data path vs synthetic encoding (issue 5), {datetime.now().strftime('%Y-%m-%d %H:%M')}\n",
        f"`{'OMP_NUM_THREADS=' + os.environ['OMP_NUM_THREADS'] + ' ' if 'OMP_NUM_THREADS' in os.environ else ''}"
        f"python bench/bench_data_path.py {' '.join(sys.argv[1:])}` on {name}; model {args.model}, batch "
        f"{encoder.batch_size}, {n} of {len(patches)} candidates of phantom seed {args.seed} "
        f"{'x'.join(map(str, args.shape))}; the two sides alternate, best of {args.repeats}.\n",
        "| side | images/s |",
        "|---|---|",
        f"| synthetic (pre-made pixels on the device) | {rate['synthetic']:.1f} |",
        f"| engine (volume -> cut -> window -> resize -> normalise -> encode) | {rate['engine']:.1f} |",
        f"| engine / synthetic | {ratio:.3f} |",
        "",
    ]
    if args.end_to_end:
        scan = scan_from_array(ph.hu, ph.spacing_mm, ph.origin_mm, ph.direction, source=f"phantom {args.seed}")
        full = Analyzer(dataclasses.replace(settings, scoring_mode="fast"), model=model)
        result = full.analyze(scan)
        stages = ", ".join(f"{k} {v:.2f}" for k, v in result.timings_s.items())
        lines += [f"- analyze() in memory, engine defaults ({len(result.patches)} candidates): {stages} s", ""]
    if args.gpu_memory and device.type == "cuda":
        gib = 1024 ** 3
        lines += [f"- peak GPU memory over the run: {torch.cuda.max_memory_allocated(device) / gib:.2f} GiB allocated, "
                  f"{torch.cuda.max_memory_reserved(device) / gib:.2f} GiB reserved by torch", ""]
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
