"""Differentiable gathered distances (DFM's FMN, CFA) by row-chunk size, CPU.

    PYTHONPATH=src python benchmarks/gathered_chunk.py [--repeat 10] [--threads 2]

``adtrain.memory.differentiable`` computes d(q, bank[idx]) for (M, k) candidate indices in row
chunks of about ``_ELEMS`` gathered floats. Prints, per shape, forward and forward+backward
milliseconds (median) at each chunk size and whether outputs and gradients are bit-identical to
the 2^23 chunk (the size before 2026-12-04; it stays the size off the CPU).
Shapes: DFM's validation/test batch (8 images x 28x28 patches, 8 candidates, EfficientNet-Lite0's
152 channels), CFA's (32 images x 28x28, 9 neighbours, 448 channels), a large PatchCore-sized one.
"""

from __future__ import annotations

import argparse

import torch
from _timing import median_ms

import adtrain.memory.differentiable as D

SHAPES = {  # name: (queries M, k, dim, bank K)
    "dfm_batch": (6272, 8, 152, 196),
    "cfa_batch": (25088, 9, 448, 3000),
    "large": (50000, 9, 152, 20000),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    sizes = (23, 21, 20, 19)
    print("| shape (M, k, D, K) | chunk floats | forward ms | forward+backward ms | same bits as 2^23 |")
    print("|---|---|---|---|---|")
    for name, (m, k, dim, size) in SHAPES.items():
        q = torch.randn(m, dim, generator=g).requires_grad_()
        bank = torch.randn(size, dim, generator=g).requires_grad_()
        idx = torch.randint(0, size, (m, k), generator=g)
        w = torch.randn(m, k, generator=g)
        ref = None
        for e in sizes:
            D._ELEMS["cpu"] = 1 << e

            def fwd():
                with torch.no_grad():
                    return D.gathered_distances(q, bank, idx)

            def both():
                q.grad = bank.grad = None
                out = D.gathered_distances(q, bank, idx)
                (out * w).sum().backward()
                return out.detach(), q.grad.clone(), bank.grad.clone()

            got = both()
            ref = got if ref is None else ref
            same = all(torch.equal(a, b) for a, b in zip(got, ref))
            print(f"| {name} ({m}, {k}, {dim}, {size}) | 2^{e} | {median_ms(fwd, args.repeat):.1f} | "
                  f"{median_ms(both, args.repeat):.1f} | {same} |", flush=True)
    D._ELEMS["cpu"] = 1 << 19


if __name__ == "__main__":
    main()
