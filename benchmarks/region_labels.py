"""AUPRO's region labelling of defect masks: the whole mask against the defect's bounding box.

    PYTHONPATH=src python benchmarks/region_labels.py [--masks 64] [--repeat 3]

The synthetic set's defects (scratch, blob, spots at 256 px) for one test batch of 128 images,
half of them defective; ``full`` labels each whole mask (the code before 2026-12-04),
``region_weights`` only each defect's bounding box (adtrain.metrics.aupro). Prints milliseconds
per call (median) and whether the weights are identical.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from scipy import ndimage

from adtrain.data.synthetic import DEFECT_TYPES, draw_defect
from adtrain.metrics.aupro import region_weights

EIGHT = np.ones((3, 3), dtype=bool)


def full(masks: np.ndarray) -> tuple[np.ndarray, int]:
    weights, num = [], 0
    for mask in masks:
        if not mask.any():
            continue
        labels, n = ndimage.label(mask, structure=EIGHT)
        sizes = np.bincount(labels.reshape(-1))
        weights.append(1.0 / sizes[labels[mask]])
        num += int(n)
    return np.concatenate(weights), num


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--masks", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    masks = np.stack([draw_defect(DEFECT_TYPES[i % 3], rng, 256)[0] > 0 for i in range(args.masks)])
    for f in (full, region_weights):
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            f(masks)
            times.append(1000 * (time.perf_counter() - t0))
        print(f"{f.__name__:<16} {statistics.median(times):7.2f} ms")
    a, b = full(masks), region_weights(masks)
    print("identical:", bool(np.array_equal(a[0], b[0]) and a[1] == b[1]))


if __name__ == "__main__":
    main()
