"""The test's pixel metrics, streamed through the adaptive bins against held and counted exactly
(`metrics.exact_pixels`, `adtrain.metrics.pixel.exact_counts`), on one test set's worth of maps.

    PYTHONPATH=src python benchmarks/pixel_exact.py [--device cpu|cuda] [--images 128] [--size 224] [--rounds 3]

Random maps (every score distinct), half the images with two defect regions whose pixels score
higher on average (so the figures are neither 0.5 nor 1). The two variants alternate round by
round in one process; each round feeds every batch of 32 maps (`update`) and computes the four
pixel metrics. Prints seconds per round (median and minimum: updates and compute together), the
figures of each variant, the streamed ones' error bounds and the largest difference from exact,
as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from adtrain.metrics.pixel import PixelMetricAccumulator


def batches(n: int, size: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    out = []
    for start in range(0, n, 32):
        b = min(32, n - start)
        masks = torch.zeros(b, size, size, dtype=torch.bool)
        masks[::2, size // 4: size // 4 + size // 8, size // 3: size // 3 + size // 6] = True
        masks[::2, size // 2: size // 2 + size // 16, size // 2: size // 2 + size // 5] = True
        maps = torch.rand(b, size, size, generator=g) + 0.6 * torch.rand(b, size, size, generator=g) * masks
        out.append((maps.to(device), masks.to(device)))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device(args.device)
    data = batches(args.images, args.size, dev)
    variants = {"streamed": 0, "exact": 1 << 24}
    times = {v: [] for v in variants}
    figures, bounds = {}, {}
    for _ in range(args.rounds):
        for name, budget in variants.items():
            acc = PixelMetricAccumulator(exact_pixels=budget)
            sync(dev)
            t = time.perf_counter()
            for maps, masks in data:
                acc.update(maps, masks)
            figures[name] = acc.compute()
            sync(dev)
            times[name].append(time.perf_counter() - t)
            bounds[name] = acc.error_bounds()
    res = {"device": str(dev), "images": args.images, "size": args.size,
           "pixels": args.images * args.size * args.size, "threads": torch.get_num_threads(), "rounds": args.rounds,
           "seconds_median": {k: round(statistics.median(v), 3) for k, v in times.items()},
           "seconds_min": {k: round(min(v), 3) for k, v in times.items()},
           "figures": figures, "streamed_error_bounds": bounds["streamed"],
           "exact_error_bounds": bounds["exact"],
           "streamed_minus_exact": {k: figures["streamed"][k] - figures["exact"][k] for k in figures["exact"]}}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
