"""Writing a result to a folder: result.json, patches.csv, montage.png, heatmap.nii.gz, lung_mask.nii.gz.

Everything is written into a temporary sibling folder that is renamed into place at the end, so a
failure or a cancel never leaves a half-written output folder behind.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from . import __version__
from .errors import InputError
from .figures import overlay_figure
from .heatmap import paint_heatmap
from .patches import slice_step_voxels
from .results import AnalysisResult
from .scan import Scan

RESULT_SCHEMA = "zeroshot-ild-result/1"


def result_to_dict(result: AnalysisResult, top_patches: int | None = None) -> dict:
    """The JSON document described in the README (schema ``zeroshot-ild-result/1``)."""
    s = result.settings
    ranked = result.ranked if top_patches is None else result.ranked[:top_patches]
    montage_rank = {int(i): k for k, i in enumerate(result.montage_indices)}
    return {
        "schema": RESULT_SCHEMA,
        "software": {"name": "zeroshot-ild", "version": __version__},
        "input": result.source,
        "model": {"name": result.model_name, "meaningful": result.model_meaningful, "checkpoint": s.checkpoint},
        "settings": s.to_dict(),
        "scan": {"shape_zyx": list(result.shape_zyx), "spacing_mm": [float(v) for v in result.spacing_mm]},
        "lung_volume_ml": round(float(result.lung_volume_ml), 2),
        "candidates": len(result.patches),
        "encoded_exactly": result.encoded_exactly,
        "probabilities": {k: float(v) for k, v in result.finding_probabilities.items()},
        "subtype_probabilities": {k: float(v) for k, v in result.subtype_probabilities.items()},
        "montage": {"file": "montage.png", "size": s.montage_size,
                    "patches": [patch_record(result, int(i)) for i in result.montage_indices]},
        "top_patches": [dict(patch_record(result, int(i)), rank=k + 1, in_montage=int(i) in montage_rank)
                        for k, i in enumerate(ranked)],
        "notes": list(result.notes),
        "timings_s": {k: round(float(v), 3) for k, v in result.timings_s.items()},
    }


def patch_record(result: AnalysisResult, i: int) -> dict:
    p = result.patches
    z, r, c = int(p.slice_index[i]), int(p.row0[i]), int(p.col0[i])
    return {
        "candidate": i,
        "slice_index": z,
        "bbox_voxels": {"x0": c, "y0": r, "x1": c + p.size_cols, "y1": r + p.size_rows, "z": z},
        "center_ras_mm": [round(float(v), 3) for v in p.center_ras_mm[i]],
        "lung_fraction": round(float(p.lung_fraction[i]), 4),
        "probabilities": {k: float(v[i]) for k, v in result.patch_probabilities.items()},
    }


def write_patches_csv(result: AnalysisResult, path: Path) -> None:
    """Every candidate, ranked by the first prompt (rank 1 = most probable)."""
    p = result.patches
    prompts = list(result.patch_probabilities)
    order = np.lexsort((np.arange(len(p)), -result.patch_probabilities[prompts[0]]))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        w = csv.writer(handle)
        w.writerow(["rank", "candidate", "slice_index", "x0", "y0", "x1", "y1", "center_r_mm", "center_a_mm",
                    "center_s_mm", "lung_fraction"] + [f"p[{q}]" for q in prompts])
        for rank, i in enumerate(order, start=1):
            r, c = int(p.row0[i]), int(p.col0[i])
            w.writerow([rank, int(i), int(p.slice_index[i]), c, r, c + p.size_cols, r + p.size_rows,
                        *(f"{v:.3f}" for v in p.center_ras_mm[i]), f"{p.lung_fraction[i]:.4f}",
                        *(f"{result.patch_probabilities[q][i]:.6f}" for q in prompts)])


def write_outputs(result: AnalysisResult, scan: Scan, out_dir: os.PathLike) -> Path:
    """Write all outputs atomically into ``out_dir`` (replacing an earlier result there)."""
    import SimpleITK as sitk

    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        with open(tmp / "result.json", "w", encoding="utf-8") as handle:
            json.dump(result_to_dict(result), handle, indent=2)
        write_patches_csv(result, tmp / "patches.csv")
        Image.fromarray(result.montage).save(tmp / "montage.png")
        slab = slice_step_voxels(scan.spacing_mm, result.settings.slice_step_mm)
        heat = paint_heatmap(result.patches, result.patch_probabilities[result.primary_prompt], scan.hu.shape,
                             slab_voxels=slab)
        # to_output_sitk: an interval series is written on a regular grid that overlays its slices.
        sitk.WriteImage(scan.to_output_sitk(heat), str(tmp / "heatmap.nii.gz"), useCompression=True)
        overlay_figure(scan, result, heat).save(tmp / "overlay.png")
        del heat
        sitk.WriteImage(scan.to_output_sitk(result.lung_mask.astype(np.uint8)), str(tmp / "lung_mask.nii.gz"),
                        useCompression=True)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def check_out_dir(out_dir: os.PathLike) -> Path:
    """Refuse an output folder that holds something other than an earlier result (it would be replaced)."""
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists():
        if not out_dir.is_dir():
            raise InputError(f"output {out_dir} exists and is not a folder: choose another --out")
        if any(out_dir.iterdir()) and not (out_dir / "result.json").is_file():
            raise InputError(f"output folder {out_dir} is not empty and holds no earlier result: choose an empty or new --out")
    return out_dir


def _replace_dir(new: Path, target: Path) -> None:
    check_out_dir(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
