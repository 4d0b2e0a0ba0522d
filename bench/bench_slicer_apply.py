"""Main-thread time to apply a result in Slicer, and a re-prompt, hosted as Slicer hosts Python (issue 23).

The panel's real Apply path (``Testing/slicer_host.py``: ``ZeroShotILD.py``'s widget and logic, the
analysis worker process, a slicer-core scene) with a main thread that holds the GIL between its
100 ms polls, as Slicer's Qt event loop does. What a user feels as a freeze is the main thread's
time inside one poll; the poll that turns the worker's result into MRML nodes (lung and pattern
segmentations, heatmap, ROIs, montage, tables, charts) is by far the longest, so per run:

- ``apply``: the longest poll of an Apply (the result applied to the scene), main thread;
- ``press``: the Apply button itself (writing the voxels for the worker, sending the request);
- ``wall``: press to result, wall clock (dominated by the analysis in the worker);
- ``Slicer-process modules``: whether torch / open_clip / lightning were imported in this process.

Runs in a fresh interpreter, so the first result pays every first-time import on the main thread
(what the issue measured at 5.8-7.4 s when that imported torch). "later" Applies analyse the same
volume again (the worker reuses its embeddings), "re-prompt" changes only the prompt.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_slicer_apply.py [--repeats 3] [--slice-step-mm 6] \
        [--out bench/RESULTS.md]
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_slicer_apply.py --lung-surface   # the 3-D Lungs surface
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing"))
sys.path.insert(0, str(REPO))

from bench.markdown_report import emit  # noqa: E402
from slicer_host import heavy_modules, host_for  # noqa: E402

DEFAULT_CT = REPO.parent / "shared" / "data" / "real" / "ct" / "totalseg" / "chest_crop_b.nii.gz"
PROMPTS = ["emphysema", "reticulation", "ground-glass opacity", "consolidation", "honeycombing"]


def _summary(values) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def lung_surface_times() -> str:
    """Markdown: the 3-D Lungs surface (``mrml_results.lung_surface``) against Slicer's own conversion.

    Synthetic two-lung masks (two ellipsoids; "ragged": 2 % of the voxels dropped at random, a worst
    case for the surface size) at chest_crop_b's size and at a full CT's; one run each, main thread.
    """
    import numpy as np

    sys.path.insert(0, str(REPO / "ZeroShotILD"))
    import slicer

    from ZeroShotILDMRML.headless import make_scene
    from ZeroShotILDMRML.mrml_results import lung_surface

    headless = make_scene()
    rows = ["| mask (z, y, x), spacing | lung_surface s (triangles) | Slicer's conversion, default smoothing s | "
            "Slicer's conversion, no smoothing s |", "|---|---|---|---|"]
    for shape, spacing_zyx in (((120, 126, 164), (1.5, 1.0, 1.0)), ((300, 512, 512), (1.0, 0.7, 0.7))):
        for ragged in (False, True):
            z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
            mask = np.zeros(shape, bool)
            for centre_x in (0.3, 0.7):
                mask |= (((z - shape[0] / 2) / (shape[0] * 0.45)) ** 2 + ((y - shape[1] / 2) / (shape[1] * 0.35)) ** 2
                         + ((x - shape[2] * centre_x) / (shape[2] * 0.18)) ** 2) < 1
            if ragged:
                mask &= np.random.default_rng(0).random(shape) > 0.02
            matrix = np.diag([spacing_zyx[2], spacing_zyx[1], spacing_zyx[0], 1.0])
            t0 = time.perf_counter()
            triangles = lung_surface(mask, matrix).GetNumberOfPolys()
            ours = time.perf_counter() - t0
            labelmap = headless.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
            labelmap.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))
            slicer.util.updateVolumeFromArray(labelmap, mask.astype(np.uint8))
            theirs = []
            for smoothing in ("0.5", "0.0"):
                seg = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
                slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, seg)
                seg.GetSegmentation().SetConversionParameter("Smoothing factor", smoothing)
                t0 = time.perf_counter()
                seg.CreateClosedSurfaceRepresentation()
                theirs.append(time.perf_counter() - t0)
                headless.scene.RemoveNode(seg)
            headless.scene.RemoveNode(labelmap)
            rows.append(f"| {'x'.join(map(str, shape))}{' ragged' if ragged else ''}, {spacing_zyx} mm | {ours:.3f} "
                        f"({triangles}) | {theirs[0]:.2f} | {theirs[1]:.2f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ct", nargs="?", type=Path, default=DEFAULT_CT, help="NIfTI CT (default: chest_crop_b)")
    ap.add_argument("--repeats", type=int, default=3, help="later Applies and re-prompts to time (default 3)")
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--slice-step-mm", type=float, default=6.0)
    ap.add_argument("--out", help="append the results as Markdown to this file")
    ap.add_argument("--lung-surface", action="store_true",
                    help="only time the 3-D Lungs surface against Slicer's own conversion (synthetic masks)")
    args = ap.parse_args()
    if args.lung_surface:
        print(lung_surface_times())
        return
    if not args.ct.is_file():
        sys.exit(f"error: no CT at {args.ct} (pass a NIfTI file)")
    settings = dict(model=args.model, device="cpu", scoring_mode="exact", slice_step_mm=args.slice_step_mm,
                    prompts=["honeycombing"])

    t0 = time.perf_counter()
    module, host = host_for(args.ct)
    load_s = time.perf_counter() - t0
    rows = {"first": [], "later": [], "reprompt": []}
    try:
        for i in range(1 + args.repeats):
            host.set(**settings)
            host.logic.session = None  # a new analysis, not a re-prompt (the worker keeps its embeddings)
            press = host.press_apply()
            wall = host.run(timeout_s=1200.0)
            result = host.logic.session.result if host.logic.session else None
            if result is None or host.errors:
                sys.exit(f"error: the Apply failed: {host.errors or host.status}")
            rows["first" if i == 0 else "later"].append((max(host.poll_s), press, wall))
        patches, patterns = len(result.patches), result.patterns is not None
        for i in range(args.repeats):
            host.set(**{**settings, "prompts": [PROMPTS[i % len(PROMPTS)]]})
            press = host.press_apply()
            wall = host.run(timeout_s=300.0)
            if host.logic.session.result.primary_prompt != PROMPTS[i % len(PROMPTS)] or host.errors:
                sys.exit(f"error: the re-prompt failed: {host.errors or host.status}")
            rows["reprompt"].append((max(host.poll_s), press, wall))
    finally:
        host.close()
    heavy = heavy_modules()

    shape = "x".join(str(n) for n in result.shape_zyx)
    lines = [
        f"## Slicer main thread: applying a result and re-prompting (issue 23), {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} .venv/bin/python bench/bench_slicer_apply.py "
        f"--repeats {args.repeats} --slice-step-mm {args.slice_step_mm:g}` — scan `{args.ct.name}` ({shape} voxels, "
        f"{patches} candidate patches, pattern map {'on' if patterns else 'off'}), model `{args.model}`, exact mode; "
        f"host: `Testing/slicer_host.py` (GIL held between 100 ms polls, real widget/logic/worker, slicer-core "
        f"scene); {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}.",
        "",
        "| run | main thread: applying the result (s) | main thread: Apply button (s) | press to result, wall (s) |",
        "|---|---|---|---|",
    ]
    labels = {"first": "first result (fresh process)", "later": f"later Applies ({args.repeats})",
              "reprompt": f"re-prompts ({args.repeats})"}
    for key, label in labels.items():
        if rows[key]:
            apply_s, press_s, wall_s = zip(*rows[key])
            lines.append(f"| {label} | {_summary(apply_s)} | {_summary(press_s)} | {_summary(wall_s)} |")
    lines += ["", f"Loading the module and the scan: {load_s:.2f} s. torch / open_clip / lightning in the Slicer "
                  f"process afterwards: {', '.join(heavy) if heavy else 'none'}.", ""]
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
