"""zeroshot-ild: zero-shot ILD classification of chest CT scans with CLIP-style models.

    zeroshot-ild analyze SCAN [SCAN ...] -o DIR [options]   one scan (file or DICOM folder), or several
    zeroshot-ild demo -o DIR                                everything offline on a generated phantom
    zeroshot-ild models [--json]                            the models, their weights: found, missing, checksum
    zeroshot-ild models download NAME                       fetch an openly licensed model's weights

Exit codes (the same for zeroshot-ild-train): 0 done; 2 bad input, one line on stderr, nothing
written; 3 a batch finished but some of its items failed (each named on stderr, the others written);
130 cancelled. Nothing partial is left in --out, and only files the tool wrote itself are ever
replaced there (see the outputs module).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import Cancelled, InputError
from .settings import (COMMON_FINDINGS, DEFAULT_PATTERNS, DEFAULT_SUBTYPES, DEVICES, AnalysisSettings, LungMaskSettings,
                       OneLineArgumentParser)

EXIT_INPUT = 2
#: A batch ran to the end but some of its scans (or manifest rows) failed; the others' results are written.
EXIT_PARTIAL = 3
EXIT_CANCELLED = 130

EPILOG = """exit codes: 0 done, 2 bad input (nothing written), 3 a batch partly failed, 130 cancelled.
examples:
  zeroshot-ild demo -o demo_out
  zeroshot-ild models download clip-vit-b-32-laion && zeroshot-ild analyze chest.nii.gz -o out --model clip-vit-b-32-laion
"""
ANALYZE_EPILOG = """examples:
  zeroshot-ild analyze chest.nii.gz -o out --model clip-vit-b-32-laion
  zeroshot-ild analyze scans/*.nii.gz dicom/patient7/ -o cohort --prompt honeycombing --prompt "ground-glass opacity"
"""
DEMO_EPILOG = """examples:
  zeroshot-ild demo -o demo_out
  zeroshot-ild demo -o demo_out --overwrite --montage-size 8 --prompt honeycombing
"""
MODELS_EPILOG = """examples:
  zeroshot-ild models
  zeroshot-ild models --json --weights-dir /data/weights
"""
DOWNLOAD_EPILOG = """examples:
  zeroshot-ild models download clip-vit-b-32-laion
  HF_ENDPOINT=https://mirror.example.org zeroshot-ild models download openai-vit-b-32 --weights-dir /data/weights
"""
_STAGE_BAR = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}]"


class TqdmProgress:
    """One tqdm bar per stage on a terminal; on a log file or pipe (stderr not a TTY) one line per stage.

    The bars count units of work (slices, batches of patches) whose size varies, so they show done/total
    and times, never a rate in made-up units.
    """

    def __init__(self, enabled: bool = True, tty: Optional[bool] = None, prog: str = "zeroshot-ild"):
        self.enabled = enabled
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.prog = prog
        self._bar = None
        self._stage = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if not self.tty:
            if stage != self._stage:
                self._stage = stage
                print(f"{self.prog}: {stage}", file=sys.stderr, flush=True)
            return
        from tqdm import tqdm

        if stage != self._stage:
            self.close()
            self._stage = stage
            self._bar = tqdm(total=total or None, desc=stage, leave=False, file=sys.stderr, dynamic_ncols=True,
                             bar_format=_STAGE_BAR if total else "{desc}: {n_fmt} [{elapsed}]")
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
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress (bars on a terminal, one line per stage in a log)")
    p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                   help="more log messages (-vv: debug)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model,
                   help="registry name (see `zeroshot-ild models`), dapt:<checkpoint>, ensemble:<ensemble.json> "
                        f"(a training run's top-k, probabilities averaged), or a checkpoint path (default: {d.model})")
    g.add_argument("--checkpoint", help="weights file for a registry model (e.g. a manually downloaded CheXzero .pt)")
    g.add_argument("--weights-dir", help="folder where weights are looked for (default: $ZEROSHOT_ILD_WEIGHTS or "
                   "~/.cache/zeroshot-ild/weights)")
    g.add_argument("--device", default=d.device, choices=list(DEVICES),
                   help="auto: CUDA GPU when present, else CPU; mps: Apple GPU (when torch has it)")
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
                   help="minimum lung fraction of a montage / top patch (the method was studied at 0.2, 0.5 and 0.8)")
    g.add_argument("--scored-min-lung-fraction", type=float, default=d.scored_min_lung_fraction,
                   help="every box with at least this lung fraction is scored for the extent and heatmap, so the "
                        "pleura is covered (default %(default)s)")
    g.add_argument("--hu-window", type=float, nargs=2, metavar=("LOW", "HIGH"), default=d.hu_window,
                   help="HU window mapped to the model's input (default: lung window -1350 150)")
    g.add_argument("--montage-size", type=int, default=d.montage_size, choices=[4, 8, 16])
    g.add_argument("--retrieval", default=d.retrieval, choices=["clip", "random"],
                   help="montage patches: most probable (clip) or a seeded random draw")
    g.add_argument("--top-k", type=int, default=d.top_k, help="ranked patches listed in result.json")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--mode", dest="scoring_mode", default=d.scoring_mode, choices=["exact", "fast"],
                   help="exact: encode every candidate; fast: a cheaper search, then the best re-scored exactly")
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
                   help="a box counts as the finding when its contrast with the normal-lung text stands this many "
                        "robust SDs above what normal lungs score (the model's reference; see 'calibrate')")
    g.add_argument("--extent-min-neighbours", type=int, default=d.extent_min_neighbours, choices=range(7),
                   metavar="N", help="... and at least N of its 6 grid neighbours count too (0-6, default "
                                     "%(default)s; 0 = off)")
    g.add_argument("--patterns", help="comma-separated pattern prompts labelled into patterns.nii.gz, or 'off' "
                   "(default: " + ", ".join(DEFAULT_PATTERNS) + ")")
    g.add_argument("--normal-prompt", default=d.normal_prompt,
                   help="the normal-lung text every finding's extent is scored against")


def settings_from_args(args: argparse.Namespace) -> AnalysisSettings:
    d = AnalysisSettings()
    subtypes = [s.strip() for s in args.subtypes.split(",")] if args.subtypes is not None else list(d.subtypes)
    return AnalysisSettings(
        model=args.model, checkpoint=args.checkpoint, weights_dir=args.weights_dir, device=args.device,
        batch_size=args.batch_size, prompts=args.prompts or list(d.prompts), negatives=args.negatives,
        subtypes=subtypes, patch_mm=args.patch_mm, patch_px=args.patch_px, stride_fraction=args.stride_fraction,
        slice_step_mm=args.slice_step_mm, filter_threshold=args.filter_threshold,
        scored_min_lung_fraction=args.scored_min_lung_fraction, hu_window=tuple(args.hu_window),
        retrieval=args.retrieval, montage_size=args.montage_size, top_k=args.top_k, seed=args.seed,
        scoring_mode=args.scoring_mode, proposal_grid_tokens=args.proposal_grid_tokens,
        proposal_skip_within_mm=args.proposal_skip_within_mm, fp32_skip_within_mm=args.fp32_skip_within_mm,
        rescore_fraction=args.rescore_fraction, rescore_min=args.rescore_min,
        lung=LungMaskSettings(working_spacing_mm=args.lung_working_spacing_mm or None),
        subpleural_mm=args.subpleural_mm, extent_z=args.extent_z, extent_min_neighbours=args.extent_min_neighbours,
        patterns=_patterns_arg(args.patterns),
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

    raw = argparse.RawDescriptionHelpFormatter
    parser = OneLineArgumentParser(prog="zeroshot-ild", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                     formatter_class=raw)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress (bars on a terminal, one line per stage in a log)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log messages (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("analyze", help="analyse one or more scans", epilog=ANALYZE_EPILOG, formatter_class=raw)
    p.add_argument("inputs", nargs="+", metavar="SCAN", help="NIfTI/NRRD/MHA file or DICOM folder")
    _add_out_args(p, "output folder (one sub-folder per scan when several are given)")
    p.add_argument("--lung-mask", action="append", dest="lung_masks", metavar="FILE",
                   help="use this lung mask instead of segmenting (one non-zero value, TotalSegmentator lobes "
                        "10-14, or a label map with --lung-labels); same grid as the scan. With several scans give "
                        "one per scan, in the same order")
    p.add_argument("--lung-labels", metavar="A,B,...",
                   help="the values of a --lung-mask label map that are lung (e.g. 1,2 for lungmask R231); other "
                        "values (body, airways) are not lung")
    p.add_argument("--dicom-results", action=argparse.BooleanOptionalAction, default=None,
                   help="for a DICOM series: also write the lung mask as DICOM SEG and the probabilities (and "
                        "extent) as a DICOM SR referencing it (default: on when highdicom is installed, "
                        "pip install 'zeroshot-ild[dicom]')")
    p.add_argument("--shard", metavar="I/N",
                   help="analyse only part I of N of the inputs (for a cluster job array, e.g. "
                        "$SLURM_ARRAY_TASK_ID/16); `zeroshot-ild merge-shards OUT` then writes summary.csv")
    _add_settings_args(p)
    p = sub.add_parser("merge-shards", help="combine the cohort summaries of `analyze --shard i/N` runs",
                       description="Check that every shard of a sharded analyze run is in OUT and write its "
                                   "summary.csv, as one unsharded run over the same scans would.",
                       epilog="examples:\n"
                              "  zeroshot-ild analyze scans/*.nii.gz -o cohort --shard $SLURM_ARRAY_TASK_ID/16\n"
                              "  zeroshot-ild merge-shards cohort\n", formatter_class=raw)
    p.add_argument("out", metavar="OUT", help="the --out folder the shards wrote into")
    p.add_argument("--overwrite", action="store_true", help="replace a summary.csv there that is not the tool's")
    p = sub.add_parser("calibrate", help="build a model's normal-lung reference for the extent from normal scans",
                       description="Analyse normal scans with a model and store, beside its weights, what normal "
                                   "lung scores for each prompt and pattern: the reference the extent is measured "
                                   "against. Without one, extent is marked uncalibrated.",
                       epilog=CALIBRATE_EPILOG, formatter_class=raw)
    p.add_argument("inputs", nargs="+", metavar="NORMAL_SCAN", help="scans of normal lungs (NIfTI/NRRD/MHA or DICOM folder)")
    _add_settings_args(p)
    p = sub.add_parser("demo", help="run everything offline on a generated phantom", epilog=DEMO_EPILOG,
                       formatter_class=raw)
    _add_out_args(p, "output folder")
    p.add_argument("--phantom-seed", type=int, default=7)
    p.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), default=(120, 256, 256))
    _add_settings_args(p)
    p.set_defaults(model=None)
    p = sub.add_parser("models", help="list the models: weights found, missing or damaged; download them",
                       description="List the models and the state of their weights, or download a model's weights.",
                       epilog=MODELS_EPILOG, formatter_class=raw)
    _add_models_args(p)
    actions = p.add_subparsers(dest="action", metavar="{download}")
    q = actions.add_parser("download", help="fetch an openly licensed model's weights (pinned revision, SHA-256 "
                           "checked, resumable); for chexzero, print the steps", epilog=DOWNLOAD_EPILOG,
                           formatter_class=raw)
    q.add_argument("names", nargs="+", metavar="NAME", help="model name(s), see `zeroshot-ild models`")
    _add_models_args(q)
    return parser


def _add_models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights-dir", default=argparse.SUPPRESS,
                   help="weights folder (default: $ZEROSHOT_ILD_WEIGHTS or ~/.cache/zeroshot-ild/weights)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    p.add_argument("--no-hash", action="store_true", default=argparse.SUPPRESS,
                   help="do not hash found files (the first check of a 600 MB file takes a few seconds)")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress")


def _add_out_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("-o", "--out", required=True, help=what)
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder that holds no earlier result; only the result files "
                        "(result.json, patches.csv, ...) are written there, nothing else is touched")


def log_level(verbose: int) -> int:
    return logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING


def quiet_itk() -> None:
    """Keep ITK's own warnings (e.g. "unexpected scales in sform") off stderr.

    They print several lines each next to the tool's one-line messages; what matters in them (a
    header the reader had to repair) is checked by the scan reader itself and reported in the notes.
    """
    try:
        import SimpleITK as sitk
    except ImportError:  # pragma: no cover - a core dependency
        return
    sitk.ProcessObject.GlobalWarningDisplayOff()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=log_level(getattr(args, "verbose", 0) or 0), format="zeroshot-ild: %(message)s")
    progress = TqdmProgress(enabled=not args.quiet)
    try:
        if args.command == "models":
            return _cmd_models(args)
        quiet_itk()
        if args.command == "demo":
            return _cmd_demo(args, progress)
        if args.command == "calibrate":
            return _cmd_calibrate(args, progress)
        if args.command == "merge-shards":
            return _cmd_merge_shards(args)
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


def _cmd_merge_shards(args) -> int:
    from .shards import merge_shards

    summary, scans, failed = merge_shards(Path(args.out), overwrite=args.overwrite)
    print(f"cohort summary of {scans} scans ({failed} failed): {summary}")
    return EXIT_PARTIAL if failed else 0


def _cmd_models(args) -> int:
    """The registry with the state of each model's weights (no torch: answers at once)."""
    import json

    from .model_registry import list_models, weights_root, weights_status

    root = weights_root(getattr(args, "weights_dir", None))
    as_json = getattr(args, "json", False)
    if getattr(args, "action", None) == "download":
        return _cmd_download(args, root, as_json)
    hash_files = not getattr(args, "no_hash", False)
    rows = []
    for spec in list_models():
        row = weights_status(spec, root, hash_files=hash_files)
        row.update(description=spec.description,
                   how_to_obtain=spec.how_to_obtain.format(weights_dir=root) if spec.needs_weights else "",
                   download_command=f"zeroshot-ild models download {spec.name}" if spec.download else None)
        rows.append(row)
    if as_json:
        print(json.dumps({"weights_dir": str(root), "models": rows}, indent=2))
        return 0
    print(f"weights folder: {root}  (set $ZEROSHOT_ILD_WEIGHTS or --weights-dir to change)")
    for spec, row in zip(list_models(), rows):
        state = row["state"] if row["state"] != "found" else f"found, checksum {row['checksum']}"
        print(f"\n{spec.name}  [{spec.architecture}]  weights: {state}\n  {spec.description}\n"
              f"  licence: {spec.licence}")
        if row["path"]:
            print(f"  file: {row['path']}")
        if row["state"] == "missing" or row["checksum"] == "MISMATCH":
            if spec.download:
                print(f"  get it: zeroshot-ild models download {spec.name}")
            elif spec.name == "chexzero":
                print("  get it: by hand under its licence; `zeroshot-ild models download chexzero` prints the steps")
            else:
                print("  get it: " + spec.how_to_obtain.format(weights_dir=root))
    return 0


def _cmd_download(args, root: Path, as_json: bool) -> int:
    import json

    from .model_registry import get_spec
    from .weights_download import CHEXZERO_STEPS, download_model

    for name in args.names:
        get_spec(name)  # every name checked before the first download
    done = {}
    log = (lambda line: print(line, file=sys.stderr)) if as_json else print
    for name in args.names:
        if name == "chexzero":
            print(CHEXZERO_STEPS.format(folder=root / "chexzero"))
            done[name] = None
            continue
        done[name] = str(download_model(name, root, log=log, progress_bars=sys.stderr.isatty() and not args.quiet))
    if as_json:
        print(json.dumps({"weights_dir": str(root), "downloaded": done}, indent=2))
    return 0


def _run_one(scan_path, out_dir: Path, settings: AnalysisSettings, progress, cache_dir, analyzer=None, *,
             lung_mask_path=None, lung_labels=None, overwrite: bool = False, dicom_results=None):
    from .embeddings import EmbeddingCache
    from .ensemble import make_analyzer
    from .outputs import write_outputs
    from .scan import read_scan

    if analyzer is None:
        analyzer = make_analyzer(settings, progress=progress, cache=EmbeddingCache(cache_dir))
    scan = read_scan(scan_path) if not hasattr(scan_path, "hu") else scan_path
    mask = read_lung_mask(lung_mask_path, scan, lung_labels=lung_labels) if lung_mask_path else None
    result = analyzer.analyze(scan, lung_mask=mask)
    if mask is not None:
        result.notes.append(f"lung mask read from {Path(lung_mask_path).name}, not segmented")
    progress("writing outputs", 0, 1)
    write_outputs(result, scan, out_dir, overwrite=overwrite, dicom=dicom_results)
    progress.close()
    return result, analyzer


def read_lung_mask(path, scan, *, lung_labels=None):
    """A lung mask file on the scan's grid as a bool array; one-line error otherwise.

    Which values are lung: ``lung_labels.lung_mask_from_labels`` (a label map needs ``lung_labels``).
    """
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
    from .lung_labels import lung_mask_from_labels

    return lung_mask_from_labels(sitk.GetArrayFromImage(image), lung_labels, name=path.name)


def _summary(result, out_dir: Path) -> str:
    lines = [f"{result.source or 'scan'} -> {out_dir}"]
    if not result.model_meaningful:
        # Before any number: a reader must not take in the probabilities before learning they mean nothing.
        lines.append(f"  WARNING: the scores below are NOT meaningful: {result.model_warning or 'see the notes'}")
    lines.append(f"  lung volume {result.lung_volume_ml:.0f} mL, {len(result.patches)} scored boxes")
    for k, v in result.finding_probabilities.items():
        lines.append(f"  P({k}) = {v:.3f}")
        ext = result.extent.get(k)
        if ext and ext["lung_fraction"] == ext["lung_fraction"]:
            lines.append(f"  extent({k}) = {100 * ext['lung_fraction']:.1f} % of the lung "
                         f"({ext['predominance']}{'' if ext.get('calibrated') else '; UNCALIBRATED'})")
    for k, v in result.subtype_probabilities.items():
        lines.append(f"  P({k}) = {v:.3f}")
    lines += [f"  note: {n}" for n in result.notes if result.model_meaningful or n != result.model_warning]
    return "\n".join(lines)


def _cmd_analyze(args, progress) -> int:
    from .model_registry import check_model_available

    settings = settings_from_args(args)
    # Model name and weights first, without torch: an unknown model or missing weights is answered at
    # once, not after the scan and its lung mask have been processed.
    check_model_available(settings.model, settings.checkpoint, settings.weights_dir)
    from .outputs import SUMMARY_HEAD, SUMMARY_NAME, check_summary_path, prepare_out_dir, summary_row, write_summary

    out = Path(args.out)
    many = len(args.inputs) > 1
    masks = args.lung_masks or []
    if masks and len(masks) != len(args.inputs):
        raise InputError(f"{len(masks)} --lung-mask for {len(args.inputs)} scans: give one --lung-mask per scan, "
                         "in the same order, or none")
    for mask in masks:
        if not Path(mask).expanduser().is_file():
            raise InputError(f"lung mask {mask} does not exist: give a NIfTI/NRRD/MHA file")
    from .lung_labels import parse_lung_labels

    lung_labels = parse_lung_labels(args.lung_labels)
    if lung_labels and not masks:
        raise InputError("--lung-labels says which values of a --lung-mask are lung: give --lung-mask too")
    if args.dicom_results:
        from .dicom_results import INSTALL_HINT, highdicom_available

        if not highdicom_available():
            raise InputError(f"--dicom-results needs highdicom, which is not installed: {INSTALL_HINT}, or leave "
                             "the option out")
    names = output_names(args.inputs)
    if many and SUMMARY_NAME.lower() in (n.lower() for n in names):
        raise InputError(f"a scan's output folder would be named {SUMMARY_NAME}, the cohort summary's name: rename "
                         "that scan file")
    all_inputs, shard = list(args.inputs), None
    if getattr(args, "shard", None):  # this job's part of the cohort; folder names as in an unsharded run
        from .shards import parse_shard, shard_indices

        shard = parse_shard(args.shard)
        keep = shard_indices(all_inputs, *shard)
        args.inputs, names = [all_inputs[k] for k in keep], [names[k] for k in keep]
        masks = [masks[k] for k in keep] if masks else masks
    targets = [out / name for name in names] if many else [out]
    # Every output place is checked before the first scan is read: no refusal after an hour of work.
    for target in targets:
        prepare_out_dir(target, overwrite=args.overwrite)
    summary = check_summary_path(out, overwrite=args.overwrite) if many else None
    if shard is not None and many:
        from .shards import shard_summary_path

        summary = shard_summary_path(out, *shard)
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
                                        lung_mask_path=masks[k] if masks else None, lung_labels=lung_labels,
                                        overwrite=args.overwrite,
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
    if shard is not None and many:
        from .shards import write_shard_record

        write_shard_record(out, *shard, all_inputs, keep, rows)
    if summary is not None:
        print(f"cohort summary: {summary}")
    if failed:
        print(f"zeroshot-ild: error: {failed} of {len(args.inputs)} scans failed (listed in {summary})", file=sys.stderr)
        return EXIT_PARTIAL
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


CALIBRATE_EPILOG = """examples:
  zeroshot-ild calibrate normal1.nii.gz normal2.nii.gz normal3/ --model biomedclip
  zeroshot-ild calibrate normals/*.nii.gz --model dapt:run/best.safetensors --prompt honeycombing
"""


def _cmd_calibrate(args, progress) -> int:
    """Normal scans -> the reference file beside the model's weights (``calibration``)."""
    import dataclasses

    from . import calibration
    from .file_hashes import sha256_file

    # Every box encoded exactly: the reference is what every later analysis compares with.
    settings = dataclasses.replace(settings_from_args(args), scoring_mode="exact").validate()
    references, model = calibration.calibrate(args.inputs, settings, progress=progress)
    if model.checkpoint is None:
        raise InputError(f"model '{model.spec.name}' has no weights file (random weights): there is nothing to "
                         "calibrate; choose a model with weights")
    path = calibration.write_references(model.checkpoint, sha256_file(model.checkpoint), model.spec.name,
                                        settings.normal_prompt, references, settings.patch_key(),
                                        made_by=f"zeroshot-ild calibrate ({len(args.inputs)} normal scans)")
    progress.close()
    for prompt, ref in references.items():
        print(f"{prompt}: normal median {ref['centre']:+.4f}, robust SD {ref['spread']:.4f} "
              f"({ref['patches']} boxes from {ref['scans']} scans)")
    print(f"reference written to {path}")
    return 0


def _cmd_demo(args, progress) -> int:
    from .model_registry import check_model_available, get_spec, list_models
    from .outputs import prepare_out_dir
    from .phantom import generate_phantom
    from .scan import scan_from_array

    if args.model is None:
        args.model = _demo_model()
    settings = settings_from_args(args)
    check_model_available(settings.model, settings.checkpoint, settings.weights_dir)
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
    from .model_registry import _PACKAGE_WEIGHTS, get_spec

    spec = get_spec("phantom-demo")
    if any((_PACKAGE_WEIGHTS / f).is_file() for f in spec.files):
        return "phantom-demo"
    return "tiny-random"


if __name__ == "__main__":
    sys.exit(main())
