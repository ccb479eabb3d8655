"""The certified low-precision nearest-item search: sorted pass (topk) against the row-minimum pass.

    python benchmarks/nearest_pass.py [--device cuda] [--bank 36000] [--dim 1536] [--queries 131072]

A PatchCore-like bank and queries (post-ReLU features around a shared mean: dense, as a texture
bank of WRN50 layer2+layer3 features; 36,000 x 1,536 is a 10 % coreset of 352 images at 256 px),
searched for the nearest item (k = 1) two ways on ``--device``, both centred on the bank's mean:
``sorted`` = ``lowp.certified_pass`` (the k + 32 smallest lower bounds by ``topk``) +
``dense_exact.certified_rerank``, the path PatchCore took before; ``minimum`` =
``lowp_nearest.certified_nearest``. Prints the milliseconds of each (median of --repeat after a
warm-up, synchronised), the queries per second, whether both give the same neighbours and
distances, and the fp32 reference's agreement on a sample of queries.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _time(fn, repeat: int, sync) -> tuple[float, object]:
    out = fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3, out


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bank", type=int, default=36000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--queries", type=int, default=131072)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--query-chunk", type=int, default=16384)
    ap.add_argument("--bank-chunk", type=int, default=4096)
    args = ap.parse_args()
    from adtrain.memory.bank import LOWP_PAD, rerank
    from adtrain.memory.dense_exact import certified_rerank
    from adtrain.memory.index import exact_distances
    from adtrain.memory.lowp import certified_pass
    from adtrain.memory.lowp_nearest import certified_nearest

    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device=dev).manual_seed(0)
    mean = torch.rand(args.dim, generator=g, device=dev) * 2 + 1
    bank = torch.relu(mean + 0.4 * torch.randn(args.bank, args.dim, generator=g, device=dev))
    queries = torch.relu(mean + 0.4 * torch.randn(args.queries, args.dim, generator=g, device=dev))
    center = bank.mean(dim=0)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def sorted_pass():
        cand, low, thr = certified_pass(queries, bank, 1, LOWP_PAD, dtype, args.query_chunk, args.bank_chunk,
                                        dev, center=center)
        return certified_rerank(queries, bank, cand, low, 1, None, rerank, dev, thr=thr)

    def minimum_pass():
        return certified_nearest(queries, bank, dtype, args.query_chunk, args.bank_chunk, rerank, dev,
                                 center=center, cap=1 + LOWP_PAD)

    ms_sorted, (d0, i0) = _time(sorted_pass, args.repeat, sync)
    ms_min, (d1, i1) = _time(minimum_pass, args.repeat, sync)
    sample = torch.arange(0, args.queries, max(1, args.queries // 512), device=dev)
    full = exact_distances(queries[sample], bank, torch.arange(args.bank, device=dev).expand(len(sample), -1), dev)
    rd, ri = torch.sort(full, dim=1, stable=True)
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "bank": args.bank, "dim": args.dim, "queries": args.queries, "dtype": args.dtype,
           "sorted_ms": round(ms_sorted, 2), "minimum_ms": round(ms_min, 2),
           "sorted_queries_per_s": round(args.queries / ms_sorted * 1e3),
           "minimum_queries_per_s": round(args.queries / ms_min * 1e3),
           "speedup": round(ms_sorted / ms_min, 2),
           "same_neighbours": bool(torch.equal(i0, i1)), "same_distances": bool(torch.equal(d0, d1)),
           "reference_sample_equal": bool(torch.equal(i1[sample, 0], ri[:, 0]) and torch.equal(d1[sample, 0], rd[:, 0]))}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
