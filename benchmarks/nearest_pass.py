"""The certified low-precision nearest-item search: sorted pass (topk) against the row-minimum pass.

    python benchmarks/nearest_pass.py [--device cuda] [--bank 36000] [--dim 1536] [--queries 131072]
    PYTHONPATH=src python benchmarks/nearest_pass.py --run-dir RUN_DIR [--images 2] [--device cuda]

A PatchCore-like bank and queries (post-ReLU features around a shared mean: dense, as a texture
bank of WRN50 layer2+layer3 features; 36,000 x 1,536 is a 10 % coreset of 352 images at 256 px),
searched for the nearest item (k = 1) two ways on ``--device``, both centred on the bank's mean:
``sorted`` = ``lowp.certified_pass`` (the k + 32 smallest lower bounds by ``topk``) +
``dense_exact.certified_rerank``, the path PatchCore took before; ``minimum`` =
``lowp_nearest.certified_nearest``. Prints the milliseconds of each (median of --repeat after a
warm-up, synchronised), the queries per second, whether both give the same neighbours and
distances, and the fp32 reference's agreement on a sample of queries. ``minimum`` runs at the
bank's ``lowp_nearest.nearest_cap`` (the candidates a query may be re-ranked over before a full
fp32 search) and again at 33 (the cap before 2026-12-07), each with the queries it searched again
in full. ``--run-dir``: a finished PatchCore run's own bank and the patch features of its first
``--images`` test images instead of the synthetic ones.
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
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--images", type=int, default=2)
    args = ap.parse_args()
    from adtrain.memory.bank import LOWP_PAD, rerank
    from adtrain.memory.dense_exact import certified_rerank
    from adtrain.memory.index import exact_distances
    from adtrain.memory.lowp import certified_pass
    import adtrain.memory.lowp_nearest as ln
    from adtrain.memory.lowp_nearest import certified_nearest, nearest_cap

    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.run_dir:
        from _timing import run_patch_queries

        method, _, _, queries = run_patch_queries(args.run_dir, args.images)
        bank = method.model.memory.bank.float().to(dev)
        queries = queries.to(dev)
        args.bank, args.dim, args.queries = bank.shape[0], bank.shape[1], queries.shape[0]
    else:
        g = torch.Generator(device=dev).manual_seed(0)
        mean = torch.rand(args.dim, generator=g, device=dev) * 2 + 1
        bank = torch.relu(mean + 0.4 * torch.randn(args.bank, args.dim, generator=g, device=dev))
        queries = torch.relu(mean + 0.4 * torch.randn(args.queries, args.dim, generator=g, device=dev))
    center = bank.mean(dim=0)
    cap = nearest_cap(args.bank, 1 + LOWP_PAD)
    searched_again = []
    full_search = ln.exact_search

    def counted(q, *a, **k):
        searched_again.append(q.shape[0])
        return full_search(q, *a, **k)

    ln.exact_search = counted
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def sorted_pass():
        cand, low, thr = certified_pass(queries, bank, 1, LOWP_PAD, dtype, args.query_chunk, args.bank_chunk,
                                        dev, center=center)
        return certified_rerank(queries, bank, cand, low, 1, None, rerank, dev, thr=thr)

    def minimum_pass(c):
        searched_again.clear()
        return certified_nearest(queries, bank, dtype, args.query_chunk, args.bank_chunk, rerank, dev,
                                 center=center, cap=c)

    ms_sorted, (d0, i0) = _time(sorted_pass, args.repeat, sync)
    ms_33, (d2, i2) = _time(lambda: minimum_pass(33), args.repeat, sync)
    again_33 = sum(searched_again)
    ms_min, (d1, i1) = _time(lambda: minimum_pass(cap), args.repeat, sync)
    again = sum(searched_again)
    sample = torch.arange(0, args.queries, max(1, args.queries // 512), device=dev)
    full = exact_distances(queries[sample], bank, torch.arange(args.bank, device=dev).expand(len(sample), -1), dev)
    rd, ri = torch.sort(full, dim=1, stable=True)
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "bank": args.bank, "dim": args.dim, "queries": args.queries, "dtype": args.dtype,
           "sorted_ms": round(ms_sorted, 2), "minimum_ms": round(ms_min, 2),
           "sorted_queries_per_s": round(args.queries / ms_sorted * 1e3),
           "minimum_queries_per_s": round(args.queries / ms_min * 1e3),
           "speedup": round(ms_sorted / ms_min, 2),
           "cap": cap, "searched_again": again, "minimum_cap33_ms": round(ms_33, 2), "searched_again_cap33": again_33,
           "same_neighbours": bool(torch.equal(i0, i1) and torch.equal(i2, i1)),
           "same_distances": bool(torch.equal(d0, d1) and torch.equal(d2, d1)),
           "reference_sample_equal": bool(torch.equal(i1[sample, 0], ri[:, 0]) and torch.equal(d1[sample, 0], rd[:, 0]))}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
