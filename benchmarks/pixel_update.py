"""Time the streaming pixel metrics' update for one test batch (adtrain.metrics.pixel).

    PYTHONPATH=src python benchmarks/pixel_update.py [--device cpu|cuda] [--batch 32] [--repeat 5]

Random 256x256 maps (every score distinct: the worst case for the adaptive bins), half the images
with a defect mask; prints milliseconds per `PixelMetricAccumulator.update` after the first (which
fills the bins) and the metrics, so runs on two devices can be compared.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from adtrain.metrics.pixel import PixelMetricAccumulator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    acc = PixelMetricAccumulator()
    times = []
    for _ in range(args.repeat + 1):
        maps = torch.rand(args.batch, 256, 256, generator=g).to(dev)
        masks = torch.zeros(args.batch, 256, 256, dtype=torch.bool)
        masks[::2, 100:140, 100:150] = True
        masks = masks.to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        acc.update(maps, masks)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    print(f"{args.device}: {statistics.median(times[1:]):.1f} ms per update of {args.batch} maps "
          f"(first {times[0]:.1f} ms), bins {len(acc.bins)}")
    print(acc.compute())


if __name__ == "__main__":
    main()
