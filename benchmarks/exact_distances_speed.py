"""The exact re-ranking's distances (adtrain.memory.index.exact_distances) against the former
gather / pow_ / sum / sqrt_ form, on the search shapes of PatchCore and CFA, in one process.

    PYTHONPATH=src .venv/bin/python benchmarks/exact_distances_speed.py [--repeat 2]

Prints, per shape (queries M, bank N, dim D, candidates per query K), the milliseconds of each
form (alternated, median of --repeat after a warm-up) and the largest relative difference of their
results (summation order only).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from adtrain.memory.index import exact_distances

SHAPES = ((32768, 28876, 152, 9),  # PatchCore, quickstart bank, k + 8 candidates
          (32768, 3276, 152, 2),  # PatchCore at anomalib's setting
          (100352, 3136, 448, 7))  # CFA, batch of 32, k + 4 candidates


def former(queries, bank, idx):
    q, (m, k), dim = queries.float(), idx.shape, bank.shape[1]
    rows = max(1, (1 << 23) // max(1, k * dim))
    out = torch.empty(m, k)
    for s in range(0, m, rows):
        out[s: s + rows] = (q[s: s + rows].unsqueeze(1) - bank[idx[s: s + rows]]).pow_(2).sum(dim=-1).sqrt_()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    print(f"threads {torch.get_num_threads()}")
    for m, n, d, k in SHAPES:
        q, b = torch.randn(m, d, generator=g), torch.randn(n, d, generator=g)
        idx = torch.randint(0, n, (m, k), generator=g)
        times = {"former": [], "exact_distances": []}
        for _ in range(args.repeat + 1):
            for name, fn in (("former", former), ("exact_distances", exact_distances)):
                t = time.perf_counter()
                fn(q, b, idx)
                times[name].append(time.perf_counter() - t)
        a, c = former(q, b, idx), exact_distances(q, b, idx)
        rel = float(((a - c).abs() / c.clamp_min(1e-30)).max())
        ms = {name: round(1000 * statistics.median(v[1:]), 1) for name, v in times.items()}
        print(f"M={m} N={n} D={d} K={k}: former {ms['former']} ms, exact_distances {ms['exact_distances']} ms, "
              f"max relative difference {rel:.1e}")


if __name__ == "__main__":
    main()
