"""Speed benchmark (issue 5): exact vs fast scoring mode, side by side in one run.

For the reference phantom (512x512x300 at 0.7x0.7x1.0 mm, ILD-positive, ViT-B/32 with random
weights, montage 4x4, filter 0.5) each mode runs end to end in its own subprocess (read the .nii.gz
-> lung mask -> patches -> scores -> montage -> classification -> outputs), so its peak resident
memory is its own. Then a re-prompt on the analysed scan. Printed and written as Markdown:
time of each mode and fast/exact ratio, share of the exact top-16 found in fast mode's top-16 and
in its exactly re-scored set, largest |delta p| of the montage-level probabilities, peak RSS, re-prompt
time; the same for extra (shorter, thin-slice) ILD phantoms and for each real CT in
../shared/data/real/ct. Fast mode skips slices in its proposal pass only where slices are thin, so
the extra phantoms are thin-sliced too: they test that step on other anatomy.

Each input runs in one or more CPU configurations (``--configs``): ``native`` (the CPU as it is;
bf16 proposal tower where the CPU has AMX / AVX512-BF16) and ``nobf16`` (``ONEDNN_MAX_CPU_ISA=AVX2``
and ``ZEROSHOT_ILD_CPU_BF16=0``: what a laptop without AVX-512 gets, fp32 proposal pass).
``--reprompt-check`` also times ``reprompt(..., exact=True)`` with a new prompt in each fast worker
against a fresh fast analysis with that prompt (same process, cold embedding cache).

    nice .venv/bin/python bench/bench_speed.py --out bench/RESULTS.md
    nice .venv/bin/python bench/bench_speed.py --shape 120 256 256 --spacing 1.4 1.4 2.5  # quicker look
    nice .venv/bin/python bench/bench_speed.py --configs nobf16 --no-reference --extra-seeds --real-only osic_ipf_sparse
    nice .venv/bin/python bench/bench_speed.py --models vit-b-32-random phantom-demo --reprompt-check --out bench/RESULTS.md  # issue 13 table
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.markdown_report import emit  # noqa: E402
REAL_CT = REPO.parent / "shared" / "data" / "real" / "ct"
REAL_INPUTS = ("totalseg/chest_crop_a.nii.gz", "totalseg/chest_crop_b.nii.gz", "osic_ipf_sparse")
SECOND_PROMPT = "honeycombing"
#: Environment of each CPU configuration (added to the bench's own; None removes a variable).
CONFIGS = {
    "native": {"ONEDNN_MAX_CPU_ISA": None, "ZEROSHOT_ILD_CPU_BF16": None},
    "nobf16": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ZEROSHOT_ILD_CPU_BF16": "0"},
}


def make_settings(mode: str, args) -> "AnalysisSettings":
    from ZeroShotILDLib.settings import AnalysisSettings

    s = AnalysisSettings(model=args.model, device=args.device, montage_size=4, filter_threshold=0.5, top_k=16,
                         scoring_mode=mode)
    if args.lung_working_spacing_mm:
        if "working_spacing_mm" in {f.name for f in dataclasses.fields(s.lung)}:
            s.lung = dataclasses.replace(s.lung, working_spacing_mm=args.lung_working_spacing_mm)
        else:  # until LungMaskSettings has the field (requested from the lead); read by pipeline via getattr
            s.lung.working_spacing_mm = args.lung_working_spacing_mm
    return s.validate()


# ----------------------------------------------------------------------------------------------
# Worker: one mode, one scan, in its own process
# ----------------------------------------------------------------------------------------------
def worker(args) -> None:
    import torch

    from ZeroShotILDLib.models import load_model
    from ZeroShotILDLib.outputs import write_outputs
    from ZeroShotILDLib.pipeline import Analyzer
    from ZeroShotILDLib.scan import read_scan

    torch.set_num_threads(args.threads)
    settings = make_settings(args.mode, args)
    t = time.perf_counter()
    model = load_model(settings.model, device=settings.device)
    load_s = time.perf_counter() - t
    analyzer = Analyzer(settings, model=model)
    t0 = time.perf_counter()
    scan = read_scan(args.scan)
    read_s = time.perf_counter() - t0
    result = analyzer.analyze(scan)
    t = time.perf_counter()
    write_outputs(result, scan, args.out_dir)
    outputs_s = time.perf_counter() - t
    total_s = time.perf_counter() - t0
    t = time.perf_counter()
    second = analyzer.reprompt([SECOND_PROMPT])
    reprompt_s = time.perf_counter() - t
    t = time.perf_counter()
    analyzer.reprompt([SECOND_PROMPT])  # text embedding now cached: the montage dominates
    reprompt_warm_s = time.perf_counter() - t
    state = analyzer._state
    # The analysis a user runs (read -> outputs, two re-prompts); the check below loads a second scan.
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    check = {}
    if args.reprompt_check and args.mode == "fast":
        from ZeroShotILDLib.embeddings import EmbeddingCache

        t = time.perf_counter()
        exact_second = analyzer.reprompt([SECOND_PROMPT], exact=True)
        exact_reprompt_s = time.perf_counter() - t
        fresh_settings = dataclasses.replace(settings, prompts=[SECOND_PROMPT], negatives=None)
        t = time.perf_counter()
        fresh = Analyzer(fresh_settings, model=model, cache=EmbeddingCache()).analyze(read_scan(args.scan))
        fresh_s = time.perf_counter() - t
        probs = {**exact_second.finding_probabilities, **exact_second.subtype_probabilities}
        fresh_probs = {**fresh.finding_probabilities, **fresh.subtype_probabilities}
        check = {"exact_reprompt_s": exact_reprompt_s, "fresh_s": fresh_s,
                 "top16_same": len(set(exact_second.ranked[:16].tolist()) & set(fresh.ranked[:16].tolist())) / 16,
                 "ranked": [int(i) for i in exact_second.ranked], "probabilities": probs,
                 "max_dp": max(abs(probs[k] - fresh_probs[k]) for k in fresh_probs)}
    report = {
        "mode": args.mode, "model_load_s": load_s, "read_s": read_s, "outputs_s": outputs_s, "total_s": total_s,
        "timings_s": {k: float(v) for k, v in result.timings_s.items()},
        "reprompt_s": reprompt_s, "reprompt_warm_s": reprompt_warm_s,
        "peak_rss_gb": peak_rss_gb,
        "candidates": len(result.patches), "encoded_exactly": int(result.encoded_exactly),
        "boxes": np.stack([result.patches.slice_index, result.patches.row0, result.patches.col0], 1).tolist(),
        "ranked": [int(i) for i in result.ranked], "montage": [int(i) for i in result.montage_indices],
        "exact_set": [int(i) for i in np.flatnonzero(state.exact)],
        "probabilities": {**result.finding_probabilities, **result.subtype_probabilities},
        "second_ranked": [int(i) for i in second.ranked],
        "second_probabilities": {**second.finding_probabilities, **second.subtype_probabilities},
        "fast_note": next((n for n in result.notes if n.startswith("fast mode")), ""),
        "reprompt_check": check,
    }
    Path(args.report).write_text(json.dumps(report), encoding="utf-8")


def run_worker(mode: str, scan: Path, args, tmp: Path, config: str = "native", model: str = "") -> dict:
    model = model or args.models[0]
    report = tmp / f"{model}-{config}-{mode}-{scan.name}.json"
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--scan", str(scan), "--report", str(report),
           "--out-dir", str(tmp / f"out-{model}-{config}-{mode}-{scan.name}"), "--model", model, "--device", args.device,
           "--threads", str(args.threads), "--lung-working-spacing-mm", str(args.lung_working_spacing_mm or 0)]
    if args.reprompt_check:
        cmd.append("--reprompt-check")
    env = dict(os.environ)
    for name, value in CONFIGS[config].items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env=env)
    print(f"  {model} {config:6s} {mode:5s} {scan.name}: {time.perf_counter() - t:.1f} s wall", flush=True)
    return json.loads(report.read_text(encoding="utf-8"))


def compare(exact: dict, fast: dict) -> dict:
    """Fidelity of fast against exact on the same candidates."""
    if exact["boxes"] != fast["boxes"]:
        raise RuntimeError("the two modes saw different candidate patches; compare needs the same lung mask")
    top_exact = set(exact["ranked"][:16])
    in_top = len(top_exact & set(fast["ranked"][:16])) / len(top_exact)
    in_rescored = len(top_exact & set(fast["exact_set"])) / len(top_exact)
    dp = max(abs(exact["probabilities"][k] - fast["probabilities"][k]) for k in exact["probabilities"])
    top2 = set(exact["second_ranked"][:16])
    second_in_top = len(top2 & set(fast["second_ranked"][:16])) / len(top2)
    dp2 = max(abs(exact["second_probabilities"][k] - fast["second_probabilities"][k])
              for k in exact["second_probabilities"])
    out = {"time_ratio": fast["total_s"] / exact["total_s"], "top16_in_top16": in_top,
           "top16_in_rescored": in_rescored, "max_dp": dp, "reprompt_top16_in_top16": second_in_top,
           "reprompt_max_dp": dp2}
    check = fast.get("reprompt_check") or {}
    if "ranked" in check:  # the exact re-prompt against exact mode's answer for the same prompt
        out["exact_reprompt_kept"] = len(top2 & set(check["ranked"][:16])) / len(top2)
        out["exact_reprompt_max_dp"] = max(abs(exact["second_probabilities"][k] - check["probabilities"][k])
                                           for k in exact["second_probabilities"])
    return out


# ----------------------------------------------------------------------------------------------
def lung_mask_check(hu, spacing_mm, working_spacing_mm: float) -> dict:
    from ZeroShotILDLib.lung_mask import segment_lungs

    t = time.perf_counter()
    full = segment_lungs(hu, spacing_mm)
    full_s = time.perf_counter() - t
    t = time.perf_counter()
    coarse = segment_lungs(hu, spacing_mm, working_spacing_mm=working_spacing_mm)
    coarse_s = time.perf_counter() - t
    dice = 2.0 * np.count_nonzero(full & coarse) / (np.count_nonzero(full) + np.count_nonzero(coarse))
    return {"full_s": full_s, "coarse_s": coarse_s, "dice": float(dice), "working_spacing_mm": working_spacing_mm}


def row(name: str, model: str, config: str, exact: dict, fast: dict, cmp: dict) -> str:
    check = fast.get("reprompt_check") or {}
    reprompt = (f"{check['top16_same']:.3f} / {check['max_dp']:.4f} / {check['exact_reprompt_s']:.1f} s / "
                f"{check['exact_reprompt_s'] / check['fresh_s']:.3f}" if check else "-")
    vs_exact = (f"{cmp['exact_reprompt_kept']:.3f} / {cmp['exact_reprompt_max_dp']:.4f}"
                if "exact_reprompt_kept" in cmp else "-")
    return (f"| {name} | {model} | {config} | {exact['candidates']} | {fast['encoded_exactly']} | {exact['total_s']:.1f} | "
            f"{fast['total_s']:.1f} | {cmp['time_ratio']:.3f} | {cmp['top16_in_top16']:.3f} | "
            f"{cmp['top16_in_rescored']:.3f} | {cmp['max_dp']:.4f} | {exact['peak_rss_gb']:.2f} / "
            f"{fast['peak_rss_gb']:.2f} | {fast['reprompt_s']:.3f} / {fast['reprompt_warm_s']:.3f} | "
            f"{cmp['reprompt_top16_in_top16']:.3f} | {cmp['reprompt_max_dp']:.4f} | {reprompt} | {vs_exact} |")


HEADER = ("| input | weights | CPU config | candidates | fast: encoded exactly | exact s | fast s | fast/exact "
          "| exact top-16 in fast top-16 | exact top-16 in fast's exact set | max abs dp montage "
          "| peak RSS GB exact / fast (before the re-prompt check) | re-prompt s fast (cold / warm) "
          f"| preview re-prompt '{SECOND_PROMPT}': top-16 kept | preview max abs dp "
          "| exact re-prompt vs fresh fast run: top-16 same / max abs dp / s / time ratio "
          "| exact re-prompt vs exact mode: top-16 kept / max abs dp |\n" + "|---" * 17 + "|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), help="reference phantom z y x")
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.7, 0.7, 1.0), help="reference spacing x y z (mm)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--extra-seeds", type=int, nargs="*", default=(12, 13), help="more ILD phantoms for fidelity")
    ap.add_argument("--extra-shape", type=int, nargs=3, default=(100, 512, 512))
    ap.add_argument("--extra-spacing", type=float, nargs=3, default=(0.7, 0.7, 1.0))
    ap.add_argument("--no-real", action="store_true", help="skip the real CTs")
    ap.add_argument("--real-only", nargs="+", choices=REAL_INPUTS, help="only these real CTs")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference phantom")
    ap.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["native", "nobf16"],
                    help="CPU configurations, each for exact and fast (nobf16: oneDNN limited to AVX2, "
                         "ZEROSHOT_ILD_CPU_BF16=0)")
    ap.add_argument("--reprompt-check", action="store_true",
                    help="fast workers also time an exact re-prompt against a fresh analysis with that prompt")
    ap.add_argument("--models", nargs="+", default=["vit-b-32-random"],
                    help="registry models to run, each on every input and configuration (e.g. vit-b-32-random phantom-demo)")
    ap.add_argument("--model", help=argparse.SUPPRESS)  # the worker's one model
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lung-working-spacing-mm", type=float, default=0.0,
                    help="lung segmentation grid for both modes (0 = full resolution)")
    ap.add_argument("--out", type=Path, help="append the results as Markdown to this file")
    # worker mode
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--scan", help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from ZeroShotILDLib.phantom import generate_phantom

    started = time.strftime("%Y-%m-%d %H:%M")
    load_before = os.getloadavg()
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="bench_speed_") as tmpdir:
        tmp = Path(tmpdir)
        inputs = []
        print(f"generating reference phantom {tuple(args.shape)} at {tuple(args.spacing)} mm", flush=True)
        ref = None if args.no_reference else generate_phantom(args.seed, shape_zyx=tuple(args.shape), spacing_mm=tuple(args.spacing), ild=True)
        ref_path = tmp / f"phantom{args.seed}.nii.gz"
        if ref is not None:
            ref.save(ref_path)
            if args.lung_working_spacing_mm:
                mc = lung_mask_check(ref.hu, ref.spacing_mm, args.lung_working_spacing_mm)
                notes.append(f"lung mask on the reference: full resolution {mc['full_s']:.1f} s, "
                             f"{mc['working_spacing_mm']} mm grid {mc['coarse_s']:.1f} s, Dice {mc['dice']:.4f}")
                print(notes[-1], flush=True)
            del ref
            inputs.append((f"phantom seed {args.seed} {'x'.join(map(str, args.shape))} (reference)", ref_path))
        for seed in args.extra_seeds:
            p = generate_phantom(seed, shape_zyx=tuple(args.extra_shape), spacing_mm=tuple(args.extra_spacing), ild=True)
            path = tmp / f"phantom{seed}.nii.gz"
            p.save(path)
            inputs.append((f"phantom seed {seed} {'x'.join(map(str, args.extra_shape))}", path))
        if not args.no_real and REAL_CT.exists():
            inputs += [(f"real: {name}", REAL_CT / name) for name in (args.real_only or REAL_INPUTS)
                       if (REAL_CT / name).exists()]
        elif not args.no_real:
            notes.append(f"real CTs skipped: {REAL_CT} is absent")
        for name, path in inputs:
            print(f"{name}", flush=True)
            for model in args.models:
                for config in args.configs:
                    what = f"{name}, {model}, {config}"
                    try:
                        exact = run_worker("exact", path, args, tmp, config, model)
                        fast = run_worker("fast", path, args, tmp, config, model)
                    except subprocess.CalledProcessError as exc:
                        notes.append(f"{what}: a worker failed ({exc.returncode}); see the console")
                        continue
                    cmp = compare(exact, fast)
                    rows.append(row(name, model, config, exact, fast, cmp))
                    print(HEADER.splitlines()[0] + "\n" + rows[-1], flush=True)
                    if fast["fast_note"]:
                        notes.append(f"{what}, {fast['fast_note']}")
                    if path == ref_path:
                        for mode, rep in (("exact", exact), ("fast", fast)):
                            stages = ", ".join(f"{k} {v:.1f}" for k, v in rep["timings_s"].items())
                            notes.append(f"reference, {model}, {config}, {mode}: model load {rep['model_load_s']:.1f} s "
                                         f"(not in the total); read {rep['read_s']:.1f} s; {stages}; outputs "
                                         f"{rep['outputs_s']:.1f} s; total {rep['total_s']:.1f} s; peak RSS "
                                         f"{rep['peak_rss_gb']:.2f} GB")
                    check = fast.get("reprompt_check")
                    if check:
                        notes.append(f"{what}: exact re-prompt '{SECOND_PROMPT}' {check['exact_reprompt_s']:.1f} s "
                                     f"vs a fresh fast analysis with it {check['fresh_s']:.1f} s")
    load_after = os.getloadavg()
    text = [
        f"\n## Speed: exact vs fast scoring mode (issues 5, 13), {started}\n",
        f"`OMP_NUM_THREADS=2 .venv/bin/python bench/bench_speed.py {' '.join(sys.argv[1:])}` on {platform.processor() or 'CPU'} "
        f"({os.cpu_count()} cores, shared; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after), "
        f"models {', '.join(args.models)}, device {args.device}, torch threads {args.threads}, montage 4x4, filter 0.5, "
        f"lung mask {'on a %g mm grid' % args.lung_working_spacing_mm if args.lung_working_spacing_mm else 'at full resolution'} in both modes. Each mode is its own subprocess; "
        "times are end to end (read .nii.gz -> outputs written), model load excluded. No GPU was lent.\n",
        HEADER, *rows, "", *[f"- {n}" for n in notes], "",
    ]
    emit("\n".join(text), args.out)


if __name__ == "__main__":
    main()
