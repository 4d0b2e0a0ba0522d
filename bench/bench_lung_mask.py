"""Lung mask speed (issue 5): the distance transform and the per-side boxes, side by side in one run.

On the reference phantom (512x512x300 at 0.7x0.7x1.0 mm) ``segment_lungs`` runs three ways in this
one process, alternating, each twice:

- ``scipy``: distances by ``scipy.ndimage.distance_transform_edt`` on whole slices (as before this
  change; hole filling and the interior erosion are the shipped ones in all three);
- ``edt``: the ``edt`` package's transform, still on whole slices;
- ``edt + boxes``: as shipped, each side cut to its bounding box plus the steps' reach.

It prints the best time of each, the ratios, and whether the three masks are voxel for voxel the same.
All three include the body mask (issue 15: candidates only inside the patient); ``segment_body``
is also timed alone in the same loop, so its share of the shipped time is measured in one run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_lung_mask.py --out bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.markdown_report import emit  # noqa: E402

from ZeroShotILDLib import lung_mask as lm  # noqa: E402
from ZeroShotILDLib.phantom import generate_phantom  # noqa: E402


def _scipy_distance_mm(m, samp):
    if m.all():  # scipy has no background to measure from; the shipped helper says inf
        return np.full(m.shape, np.inf)
    return ndi.distance_transform_edt(m, sampling=samp)


def _whole_slice(m, margin_px, fn, *arrays):
    return fn(m, *arrays)


@contextlib.contextmanager
def variant(name: str):
    saved = lm._distance_mm, lm._in_box
    if name == "scipy":
        lm._distance_mm, lm._in_box = _scipy_distance_mm, _whole_slice
    elif name == "edt":
        lm._in_box = _whole_slice
    try:
        yield
    finally:
        lm._distance_mm, lm._in_box = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512))
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.7, 0.7, 1.0))
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", help="append the result as Markdown to this file")
    args = ap.parse_args()

    started = datetime.now().strftime("%Y-%m-%d %H:%M")
    ph = generate_phantom(args.seed, shape_zyx=tuple(args.shape), spacing_mm=tuple(args.spacing), ild=True)
    names = ("scipy", "edt", "edt + boxes")
    times = {n: [] for n in names}
    body_times = []
    masks = {}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name in names:
            with variant(name):
                t = time.perf_counter()
                masks[name] = lm.segment_lungs(ph.hu, ph.spacing_mm)
                times[name].append(time.perf_counter() - t)
            print(f"{name}: {times[name][-1]:.1f} s", flush=True)
        t = time.perf_counter()
        body = lm.segment_body(ph.hu, ph.spacing_mm)
        body_times.append(time.perf_counter() - t)
        print(f"body mask: {body_times[-1]:.2f} s", flush=True)
    best = {n: min(v) for n, v in times.items()}
    same = {n: int(np.count_nonzero(masks[n] != masks["scipy"])) for n in names[1:]}
    dice = 2 * np.count_nonzero(masks["edt + boxes"] & ph.lung_mask) / (
        np.count_nonzero(masks["edt + boxes"]) + np.count_nonzero(ph.lung_mask))
    lines = [
        f"\n## Lung mask speed (issue 5), {started}\n",
        f"`OMP_NUM_THREADS=2 .venv/bin/python bench/bench_lung_mask.py {' '.join(sys.argv[1:])}` — phantom seed "
        f"{args.seed} {'x'.join(map(str, args.shape))} at {tuple(args.spacing)} mm, the three variants alternating in "
        f"one process, best of {args.repeats} (load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after).\n",
        "| variant | best s | vs scipy | voxels differing from scipy |",
        "|---|---|---|---|",
        *[f"| {n} | {best[n]:.1f} | {best['scipy'] / best[n]:.2f}x | {same.get(n, 0)} |" for n in names],
        "",
        f"- Dice of the shipped mask against the phantom's ground truth: {dice:.4f}",
        f"- Body mask (`segment_body`, part of every variant above): best {min(body_times):.2f} s, "
        f"{100 * min(body_times) / best['edt + boxes']:.0f} % of the shipped lung mask; Dice against the "
        f"phantom's body {2 * np.count_nonzero(body & ph.body_mask) / (np.count_nonzero(body) + np.count_nonzero(ph.body_mask)):.4f}",
        "",
    ]
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
