"""Time of one image resize under each ``data.resize`` rule (adtrain.data.resize), random uint8 RGB.

    PYTHONPATH=src .venv/bin/python benchmarks/resize_rules.py [--sizes 1024 300] [--to 256]
        [--graph-batch 8] [--threads 2]

Prints, per source size and rule, the best and median of 7 rounds of 100 calls (ms per image) of
the host resize (the data path), then the same for the export graph's resize
(``resize_tensor``, eager torch on the CPU, a batch of --graph-batch images; ms per image)."""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np

import torch

from adtrain.data.resize import RULES, resize_image, resize_tensor


def timed(f, n: int = 100) -> tuple[float, float]:
    f()
    runs = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        runs.append((time.perf_counter() - t0) / n * 1e3)
    return min(runs), float(np.median(runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 300])
    ap.add_argument("--to", type=int, default=256)
    ap.add_argument("--graph-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for src in args.sizes:
        img = np.random.default_rng(0).integers(0, 256, (src, src, 3), dtype=np.uint8)
        for rule in RULES:
            lo, med = timed(lambda: resize_image(img, (args.to, args.to), rule))
            print(f"{src}->{args.to} {rule:13s} best {lo:.3f} ms  median {med:.3f} ms  (cv2 threads {cv2.getNumThreads()})")
    for src in args.sizes:
        # as the export graph gets them: uint8 NHWC, seen as NCHW
        x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (args.graph_batch, src, src, 3), dtype=np.uint8))
        x = x.permute(0, 3, 1, 2)
        for rule in RULES:
            lo, med = timed(lambda: resize_tensor(x, (args.to, args.to), rule), n=5)
            b = args.graph_batch
            print(f"graph {src}->{args.to} {rule:13s} best {lo / b:.3f} ms/image  median {med / b:.3f} ms/image  "
                  f"(batch {b}, torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
