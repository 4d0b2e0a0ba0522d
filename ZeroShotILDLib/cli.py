"""``zeroshot-ild``: the command line over the pipeline.

    zeroshot-ild analyze SCAN [SCAN ...] -o DIR [options]   one scan (file or DICOM folder), or several
    zeroshot-ild demo -o DIR                                everything offline on a generated phantom
    zeroshot-ild models                                     the registry and where weights are looked for

Bad input ends with one line on stderr and exit code 2; nothing partial is left in --out, and only
files the tool wrote itself are ever replaced there (see ``outputs``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import Cancelled, InputError
from .settings import COMMON_FINDINGS, DEFAULT_PATTERNS, DEFAULT_SUBTYPES, AnalysisSettings, LungMaskSettings

EXIT_INPUT = 2
EXIT_CANCELLED = 130


class TqdmProgress:
    """One tqdm bar per stage on stderr."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._bar = None
        self._stage = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage != self._stage:
            self.close()
            self._stage = stage
            self._bar = tqdm(total=total or None, desc=stage, unit="", leave=False, file=sys.stderr,
                             dynamic_ncols=True)
        if self._bar is not None:
            if total and self._bar.total != total:
                self._bar.total = total
            self._bar.n = done
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _add_settings_args(p: argparse.ArgumentParser) -> None:
    d = AnalysisSettings()
    # -q is accepted before or after the sub-command; SUPPRESS keeps the top-level value otherwise.
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model,
                   help="registry name (see `zeroshot-ild models`), dapt:<checkpoint>, ensemble:<ensemble.json> "
                        f"(a training run's top-k, probabilities averaged), or a checkpoint path (default: {d.model})")
    g.add_argument("--checkpoint", help="weights file for a registry model (e.g. a manually downloaded CheXzero .pt)")
    g.add_argument("--weights-dir", help="folder where weights are looked for (default: $ZEROSHOT_ILD_WEIGHTS or "
                   "~/.cache/zeroshot-ild/weights)")
    g.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="images per forward pass; halves itself on "
                   "out-of-memory")
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT",
                   help=f"finding to search for, repeatable (default: '{d.prompts[0]}'; e.g. "
                   + ", ".join(f"'{f}'" for f in COMMON_FINDINGS[1:4]) + ")")
    g.add_argument("--negative", action="append", dest="negatives", metavar="TEXT",
                   help="negative prompt for the prompt at the same position (default: 'no {prompt}')")
    g.add_argument("--subtypes", help="comma-separated subtype names (default: " + ", ".join(DEFAULT_SUBTYPES) + ")")
    g = p.add_argument_group("patches and montage")
    g.add_argument("--patch-mm", type=float, default=d.patch_mm, help="patch side in millimetres")
    g.add_argument("--patch-px", type=int, help="patch side in pixels at native spacing (overrides --patch-mm)")
    g.add_argument("--stride-fraction", type=float, default=d.stride_fraction,
                   help="grid stride as a fraction of the patch side (1 = non-overlapping)")
    g.add_argument("--slice-step-mm", type=float, default=d.slice_step_mm, help="distance between scored slices")
    g.add_argument("--filter-threshold", type=float, default=d.filter_threshold,
                   help="minimum lung fraction of a patch (paper: 0.2, 0.5, 0.8)")
    g.add_argument("--hu-window", type=float, nargs=2, metavar=("LOW", "HIGH"), default=d.hu_window,
                   help="HU window mapped to the model's input (default: lung window -1350 150)")
    g.add_argument("--montage-size", type=int, default=d.montage_size, choices=[4, 8, 16])
    g.add_argument("--retrieval", default=d.retrieval, choices=["clip", "random"],
                   help="montage patches: most probable (clip) or a seeded random draw")
    g.add_argument("--top-k", type=int, default=d.top_k, help="ranked patches listed in result.json")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--mode", dest="scoring_mode", default=d.scoring_mode, choices=["exact", "fast"],
                   help="exact: encode every candidate; fast: two-stage search (see bench/RESULTS.md)")
    g.add_argument("--cache-dir", help="keep patch embeddings here so re-running a scan skips encoding")
    g.add_argument("--proposal-grid", dest="proposal_grid_tokens", type=int, default=d.proposal_grid_tokens,
                   help="fast mode: ViT tokens per side in the proposal pass (1 = 32 px for ViT-B/32)")
    g.add_argument("--proposal-skip-within-mm", type=float, default=d.proposal_skip_within_mm,
                   help="fast mode: the proposal pass skips slices within this distance of an encoded one, "
                        "then encodes those next to its best boxes (0 = every slice)")
    g.add_argument("--fp32-skip-within-mm", type=float, default=d.fp32_skip_within_mm,
                   help="fast mode on a CPU without native bf16: the fp32 search skips slices within this "
                        "distance of an encoded one (1 = slower but finds the exact top patches more often; "
                        "0 = every slice)")
    g.add_argument("--rescore-fraction", type=float, default=d.rescore_fraction,
                   help="fast mode: share of candidates re-scored at full resolution")
    g.add_argument("--rescore-min", type=int, default=d.rescore_min,
                   help="fast mode: re-score at least this many candidates at full resolution")
    g.add_argument("--lung-working-spacing-mm", type=float, default=d.lung.working_spacing_mm,
                   help="segment the lungs on a grid of about this spacing and upsample (0 = full resolution)")
    g = p.add_argument_group("extent and pattern map")
    g.add_argument("--subpleural-mm", type=float, default=d.subpleural_mm,
                   help="depth of the subpleural zone from the pleural surface (mm)")
    g.add_argument("--extent-z", type=float, default=d.extent_z,
                   help="a patch counts as positive when its score stands this many robust SDs above the scan's "
                        "own median (see extent.py)")
    g.add_argument("--patterns", help="comma-separated pattern prompts labelled into patterns.nii.gz, or 'off' "
                   "(default: " + ", ".join(DEFAULT_PATTERNS) + ")")
    g.add_argument("--normal-prompt", default=d.normal_prompt,
                   help="the normal-lung prompt each pattern is scored against")


def settings_from_args(args: argparse.Namespace) -> AnalysisSettings:
    d = AnalysisSettings()
    subtypes = [s.strip() for s in args.subtypes.split(",")] if args.subtypes is not None else list(d.subtypes)
    return AnalysisSettings(
        model=args.model, checkpoint=args.checkpoint, weights_dir=args.weights_dir, device=args.device,
        batch_size=args.batch_size, prompts=args.prompts or list(d.prompts), negatives=args.negatives,
        subtypes=subtypes, patch_mm=args.patch_mm, patch_px=args.patch_px, stride_fraction=args.stride_fraction,
        slice_step_mm=args.slice_step_mm, filter_threshold=args.filter_threshold, hu_window=tuple(args.hu_window),
        retrieval=args.retrieval, montage_size=args.montage_size, top_k=args.top_k, seed=args.seed,
        scoring_mode=args.scoring_mode, proposal_grid_tokens=args.proposal_grid_tokens,
        proposal_skip_within_mm=args.proposal_skip_within_mm, fp32_skip_within_mm=args.fp32_skip_within_mm,
        rescore_fraction=args.rescore_fraction, rescore_min=args.rescore_min,
        lung=LungMaskSettings(working_spacing_mm=args.lung_working_spacing_mm or None),
        subpleural_mm=args.subpleural_mm, extent_z=args.extent_z, patterns=_patterns_arg(args.patterns),
        normal_prompt=args.normal_prompt,
    ).validate()


def _patterns_arg(value: Optional[str]) -> list:
    if value is None:
        return list(DEFAULT_PATTERNS)
    if value.strip().lower() in ("off", "none", "no", "0", ""):
        return []
    return [p.strip() for p in value.split(",") if p.strip()]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="zeroshot-ild", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("analyze", help="analyse one or more scans")
    p.add_argument("inputs", nargs="+", metavar="SCAN", help="NIfTI/NRRD/MHA file or DICOM folder")
    _add_out_args(p, "output folder (one sub-folder per scan when several are given)")
    p.add_argument("--lung-mask", action="append", dest="lung_masks", metavar="FILE",
                   help="use this lung mask (any non-zero voxel is lung: TotalSegmentator, lungmask or a corrected "
                        "one) instead of segmenting; same grid as the scan. With several scans give one per scan, "
                        "in the same order")
    p.add_argument("--dicom-results", action=argparse.BooleanOptionalAction, default=None,
                   help="for a DICOM series: also write the lung mask as DICOM SEG and the probabilities (and "
                        "extent) as a DICOM SR referencing it (default: on when highdicom is installed, "
                        "pip install 'zeroshot-ild[dicom]')")
    _add_settings_args(p)
    p = sub.add_parser("demo", help="run everything offline on a generated phantom")
    _add_out_args(p, "output folder")
    p.add_argument("--phantom-seed", type=int, default=7)
    p.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), default=(120, 256, 256))
    _add_settings_args(p)
    p.set_defaults(model=None)
    sub.add_parser("models", help="list supported models and where their weights are looked for")
    return parser


def _add_out_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("-o", "--out", required=True, help=what)
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder that holds no earlier result; only the result files "
                        "(result.json, patches.csv, ...) are written there, nothing else is touched")


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="zeroshot-ild: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    progress = TqdmProgress(enabled=not args.quiet)
    try:
        if args.command == "models":
            return _cmd_models()
        if args.command == "demo":
            return _cmd_demo(args, progress)
        return _cmd_analyze(args, progress)
    except InputError as exc:
        progress.close()
        print(f"zeroshot-ild: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except (Cancelled, KeyboardInterrupt):
        progress.close()
        print("zeroshot-ild: cancelled; no output written", file=sys.stderr)
        return EXIT_CANCELLED
    finally:
        progress.close()


def _cmd_models() -> int:
    from .models import default_weights_dir, list_models

    root = default_weights_dir()
    print(f"weights folder: {root}  (set $ZEROSHOT_ILD_WEIGHTS or --weights-dir to change)")
    for spec in list_models():
        print(f"\n{spec.name}  [{spec.architecture}]\n  {spec.description}\n  licence: {spec.licence}")
        print("  weights: " + spec.how_to_obtain.format(weights_dir=root))
    return 0


def _run_one(scan_path, out_dir: Path, settings: AnalysisSettings, progress, cache_dir, analyzer=None, *,
             lung_mask_path=None, overwrite: bool = False, dicom_results=None):
    from .embeddings import EmbeddingCache
    from .ensemble import make_analyzer
    from .outputs import write_outputs
    from .scan import read_scan

    if analyzer is None:
        analyzer = make_analyzer(settings, progress=progress, cache=EmbeddingCache(cache_dir))
    scan = read_scan(scan_path) if not hasattr(scan_path, "hu") else scan_path
    mask = read_lung_mask(lung_mask_path, scan) if lung_mask_path else None
    result = analyzer.analyze(scan, lung_mask=mask)
    if mask is not None:
        result.notes.append(f"lung mask read from {Path(lung_mask_path).name}, not segmented")
    progress("writing outputs", 0, 1)
    write_outputs(result, scan, out_dir, overwrite=overwrite, dicom=dicom_results)
    progress.close()
    return result, analyzer


def read_lung_mask(path, scan):
    """A lung mask file on the scan's grid as a bool array (non-zero = lung); one-line error otherwise."""
    import numpy as np
    import SimpleITK as sitk

    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"lung mask {path} does not exist: give a NIfTI/NRRD/MHA file")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(f"lung mask {path} is not a readable image: give a NIfTI/NRRD/MHA label file") from None
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise InputError(f"lung mask {path} is not a 3-D label image")
    size_zyx = tuple(reversed(image.GetSize()))
    problems = []
    if size_zyx != scan.shape_zyx:
        problems.append(f"size {size_zyx} vs {scan.shape_zyx} (z, y, x)")
    else:
        if not np.allclose(image.GetSpacing(), scan.spacing_mm, rtol=1e-4, atol=1e-4):
            problems.append(f"spacing {tuple(round(v, 4) for v in image.GetSpacing())} vs "
                            f"{tuple(round(float(v), 4) for v in scan.spacing_mm)} mm")
        if not np.allclose(image.GetOrigin(), scan.origin_mm, atol=1e-2):
            problems.append(f"origin {tuple(round(v, 2) for v in image.GetOrigin())} vs "
                            f"{tuple(round(float(v), 2) for v in scan.origin_mm)} mm")
        if not np.allclose(image.GetDirection(), scan.direction, atol=1e-3):
            problems.append("direction cosines differ")
    if problems:
        raise InputError(f"lung mask {path.name} is not on the scan's grid ({'; '.join(problems)}): resample it "
                         "onto the scan first")
    mask = sitk.GetArrayFromImage(image) != 0
    if not mask.any():
        raise InputError(f"lung mask {path.name} is empty (no non-zero voxel)")
    return mask


def _summary(result, out_dir: Path) -> str:
    lines = [f"{result.source or 'scan'} -> {out_dir}",
             f"  lung volume {result.lung_volume_ml:.0f} mL, {len(result.patches)} candidate patches"]
    for k, v in result.finding_probabilities.items():
        lines.append(f"  P({k}) = {v:.3f}")
        ext = result.extent.get(k)
        if ext and ext["lung_fraction"] == ext["lung_fraction"]:
            lines.append(f"  extent({k}) = {100 * ext['lung_fraction']:.1f} % of the scored lung "
                         f"({ext['predominance']})")
    for k, v in result.subtype_probabilities.items():
        lines.append(f"  P({k}) = {v:.3f}")
    lines += [f"  note: {n}" for n in result.notes]
    return "\n".join(lines)


def _cmd_analyze(args, progress) -> int:
    from .outputs import SUMMARY_HEAD, SUMMARY_NAME, check_summary_path, prepare_out_dir, summary_row, write_summary

    settings = settings_from_args(args)
    out = Path(args.out)
    many = len(args.inputs) > 1
    masks = args.lung_masks or []
    if masks and len(masks) != len(args.inputs):
        raise InputError(f"{len(masks)} --lung-mask for {len(args.inputs)} scans: give one --lung-mask per scan, "
                         "in the same order, or none")
    for mask in masks:
        if not Path(mask).expanduser().is_file():
            raise InputError(f"lung mask {mask} does not exist: give a NIfTI/NRRD/MHA file")
    if args.dicom_results:
        from .dicom_results import INSTALL_HINT, highdicom_available

        if not highdicom_available():
            raise InputError(f"--dicom-results needs highdicom, which is not installed: {INSTALL_HINT}, or leave "
                             "the option out")
    names = output_names(args.inputs)
    if many and SUMMARY_NAME.lower() in (n.lower() for n in names):
        raise InputError(f"a scan's output folder would be named {SUMMARY_NAME}, the cohort summary's name: rename "
                         "that scan file")
    targets = [out / name for name in names] if many else [out]
    # Every output place is checked before the first scan is read: no refusal after an hour of work.
    for target in targets:
        prepare_out_dir(target, overwrite=args.overwrite)
    summary = check_summary_path(out, overwrite=args.overwrite) if many else None
    rows = []
    if many:
        print("output folders:")
        for path, target in zip(args.inputs, targets):
            print(f"  {path} -> {target}")
    analyzer = None
    failed = 0
    for k, (path, target) in enumerate(zip(args.inputs, targets)):
        try:
            result, analyzer = _run_one(path, target, settings, progress, args.cache_dir, analyzer,
                                        lung_mask_path=masks[k] if masks else None, overwrite=args.overwrite,
                                        dicom_results=args.dicom_results)
        except InputError as exc:
            if not many:
                raise
            # One bad scan in a cohort (no lungs, damaged file) is reported and the rest analysed:
            # a night's batch must not stop at scan 3 of 200. Its folder is not written.
            progress.close()
            failed += 1
            print(f"zeroshot-ild: error: {path}: {exc}", file=sys.stderr)
            rows.append({**dict.fromkeys(SUMMARY_HEAD, ""), "input": str(path), "error": str(exc)})
            write_summary(rows, summary)
            continue
        print(_summary(result, target))
        if summary is not None:
            # Rewritten (atomically) after every scan: a stopped run leaves the rows of the scans it finished.
            rows.append(summary_row(result, str(path), names[k]))
            write_summary(rows, summary)
    if summary is not None:
        print(f"cohort summary: {summary}")
    if failed:
        print(f"zeroshot-ild: error: {failed} of {len(args.inputs)} scans failed (listed in {summary})", file=sys.stderr)
        return EXIT_INPUT
    return 0


_SCAN_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def _stem(name: str) -> str:
    for ext in _SCAN_SUFFIXES:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _clean(name: str) -> str:
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".")
    return name or "scan"


def output_names(inputs: Sequence[str]) -> list:
    """One sub-folder name per input, unique (case-insensitively) and predictable from the paths alone.

    The file name without its extension; where two inputs share it, the parent folder names are
    prefixed (``patA_chest``, ``patB_chest``) until they differ, then ``-2``, ``-3`` ... in input order.
    """
    parts = []
    for p in inputs:
        path = Path(os.path.abspath(os.path.expanduser(str(p))))
        parts.append([_clean(_stem(path.name))] + [_clean(a.name) for a in path.parents if a.name])
    depth = [1] * len(parts)
    while True:
        names = ["_".join(reversed(pp[:d])) for pp, d in zip(parts, depth)]
        seen: dict = {}
        for i, n in enumerate(names):
            seen.setdefault(n.lower(), []).append(i)
        grown = False
        for group in seen.values():
            if len({tuple(parts[i]) for i in group}) > 1:  # the same path twice only gets a suffix
                for i in group:
                    if depth[i] < len(parts[i]):
                        depth[i] += 1
                        grown = True
        if not grown:
            break
    final, used = [], set()
    for n in names:
        candidate, k = n, 1
        while candidate.lower() in used:
            k += 1
            candidate = f"{n}-{k}"
        used.add(candidate.lower())
        final.append(candidate)
    return final


def _cmd_demo(args, progress) -> int:
    from .models import get_spec, list_models
    from .outputs import prepare_out_dir
    from .phantom import generate_phantom
    from .scan import scan_from_array

    if args.model is None:
        args.model = _demo_model()
    settings = settings_from_args(args)
    if settings.model in {s.name for s in list_models()} and not get_spec(settings.model).meaningful:
        print(f"zeroshot-ild demo: model '{settings.model}' has random weights, so its scores are meaningless; "
              "this demo shows the pipeline and its outputs, not a diagnosis.", file=sys.stderr)
    phantom = generate_phantom(args.phantom_seed, shape_zyx=tuple(args.shape), spacing_mm=(1.4, 1.4, 2.5),
                               subtype="idiopathic pulmonary fibrosis")
    scan = scan_from_array(phantom.hu, phantom.spacing_mm, phantom.origin_mm, phantom.direction,
                           source=f"phantom(seed={args.phantom_seed})")
    out = prepare_out_dir(args.out, overwrite=args.overwrite)
    result, _ = _run_one(scan, out, settings, progress, args.cache_dir, overwrite=args.overwrite)
    print(_summary(result, out))
    return 0


def _demo_model() -> str:
    """The phantom-trained model when it ships with the package, else the tiny random one."""
    from .models import _PACKAGE_WEIGHTS, get_spec

    spec = get_spec("phantom-demo")
    if any((_PACKAGE_WEIGHTS / f).is_file() for f in spec.files):
        return "phantom-demo"
    return "tiny-random"


if __name__ == "__main__":
    sys.exit(main())
