"""First contact: how fast the command line answers the questions a new user hits first (issue 22).

Times, as a user sees them (a fresh process each, wall clock, median of --repeats):

- ``zeroshot-ild analyze SCAN --model no-such-model``      unknown model
- ``zeroshot-ild analyze SCAN [--model chexzero]`` with an empty weights folder: missing weights
- ``zeroshot-ild-train --help`` and ``zeroshot-ild --help``
- ``zeroshot-ild models`` (no hashing) and ``--version`` of both commands

SCAN is a real chest CT from ../shared/data when there is one (the refusals must come before it is
read), else a 120 x 256 x 256 phantom written to a temporary folder.

    .venv/bin/python bench/bench_first_contact.py [--repeats 5] [--scan FILE]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _scan(tmp: Path, given) -> Path:
    if given:
        return Path(given)
    shared = REPO.parent / "shared" / "data"
    for pattern in ("**/*.nii.gz", "**/*.nrrd", "**/*.mha"):
        hits = sorted(shared.glob(pattern)) if shared.is_dir() else []
        if hits:
            return max(hits, key=lambda p: p.stat().st_size)
    sys.path.insert(0, str(REPO))
    from ZeroShotILDLib.phantom import generate_phantom

    path = tmp / "phantom.nii.gz"
    generate_phantom(7, shape_zyx=(120, 256, 256), spacing_mm=(1.4, 1.4, 2.5)).save(path)
    return path


def _time(argv, env, repeats: int):
    times, last = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        last = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=env["HOME_TMP"])
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times), last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scan", help="scan file to pass (default: a real CT from ../shared/data, else a phantom)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        scan = _scan(tmp, args.scan)
        empty = tmp / "no-weights"
        empty.mkdir()
        env = dict(os.environ, ZEROSHOT_ILD_WEIGHTS=str(empty), ZEROSHOT_ILD_HASH_MEMO="", HOME_TMP=str(tmp))
        zs, train = str(BIN / "zeroshot-ild"), str(BIN / "zeroshot-ild-train")
        cases = [
            ("unknown --model (before the scan is read)",
             [zs, "analyze", str(scan), "-o", str(tmp / "o1"), "--model", "no-such-model"], 2),
            ("missing CheXzero weights (before the scan is read)",
             [zs, "analyze", str(scan), "-o", str(tmp / "o2"), "--model", "chexzero"], 2),
            ("missing weights of the default model", [zs, "analyze", str(scan), "-o", str(tmp / "o3")], 2),
            ("zeroshot-ild-train --help", [train, "--help"], 0),
            ("zeroshot-ild --help", [zs, "--help"], 0),
            ("zeroshot-ild models --no-hash", [zs, "models", "--no-hash"], 0),
            ("zeroshot-ild --version", [zs, "--version"], 0),
            ("zeroshot-ild-train --version", [train, "--version"], 0),
        ]
        print(f"scan: {scan} ({scan.stat().st_size / 1e6:.0f} MB); {args.repeats} runs each; "
              f"{os.cpu_count()} CPUs; python {sys.version.split()[0]}")
        print(f"| command | median s | min s | max s | exit | first line of stderr |")
        print("|---|---|---|---|---|---|")
        failed = False
        for name, argv, code in cases:
            median, lo, hi, proc = _time(argv, env, args.repeats)
            first = (proc.stderr.strip().splitlines() or [""])[0][:70]
            print(f"| {name} | {median:.2f} | {lo:.2f} | {hi:.2f} | {proc.returncode} | {first} |")
            failed |= proc.returncode != code
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
