"""Dynamic int8 vs fp32 for the ViT-B/32 image tower on this CPU (issue 13: a cheaper proposal pass?).

Quantizes the tower's Linear layers with ``torch.ao.quantization.quantize_dynamic`` for each
quantized engine torch offers here, and times fp32 and int8 forward passes alternately in one
process (this machine's speed drifts between minutes). Prints images/s, the speed-up and the least
cosine between int8 and fp32 features. Random weights: the speed does not depend on them.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_int8_tower.py
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import open_clip

    warnings.filterwarnings("ignore")  # open_clip: "no pretrained weights"; torch: quantize_dynamic deprecation
    torch.set_num_threads(args.threads)
    tower = open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()
    pixels = torch.randn(args.batch, 3, 224, 224)
    quantized = {}
    for engine in torch.backends.quantized.supported_engines:
        if engine == "none":
            continue
        torch.backends.quantized.engine = engine
        quantized[engine] = torch.ao.quantization.quantize_dynamic(tower, {torch.nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        reference = tower(pixels)
        for r in range(args.rounds):
            t = time.perf_counter()
            tower(pixels)
            fp32_s = time.perf_counter() - t
            for engine, model in quantized.items():
                torch.backends.quantized.engine = engine
                t = time.perf_counter()
                out = model(pixels)
                int8_s = time.perf_counter() - t
                cos = torch.nn.functional.cosine_similarity(out, reference).min().item()
                print(f"round {r} {engine}: fp32 {args.batch / fp32_s:.1f} images/s, int8 {args.batch / int8_s:.1f} "
                      f"images/s, x{fp32_s / int8_s:.2f}, least cosine {cos:.5f}", flush=True)


if __name__ == "__main__":
    main()
