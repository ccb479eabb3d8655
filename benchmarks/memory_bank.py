"""Memory bank figures: coreset build time and k-NN search throughput versus bank size.

    python benchmarks/memory_bank.py [--sizes 10000 100000 1000000] [--dim 1536] [--queries 4096]
        [--backends faiss:flat faiss:ivf faiss:hnsw faiss:ivfpq torch:flat] [--device cpu|cuda]
        [--coreset-ratio 0.1] [--coreset-max 400000]

Random Gaussian data (clustered, so approximate indexes have structure to exploit). For each
size: greedy coreset time (ratio of N, on --device; skipped above --coreset-max), then for each
backend: index build seconds, search queries/s (k=1) and recall@1 against the exact search.
Prints a markdown table; --out FILE also writes JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from adtrain.memory import MemoryBank, greedy_coreset


def clustered(n: int, dim: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(256, dim, generator=g) * 4
    out = torch.empty(n, dim)
    for s in range(0, n, 262_144):
        e = min(n, s + 262_144)
        idx = torch.randint(0, 256, (e - s,), generator=g)
        out[s:e] = centres[idx] + torch.randn(e - s, dim, generator=g)
    return out.to(device)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--queries", type=int, default=4096)
    ap.add_argument("--backends", nargs="+", default=["faiss:flat", "faiss:ivf", "faiss:hnsw", "faiss:ivfpq", "torch:flat"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--coreset-ratio", type=float, default=0.1)
    ap.add_argument("--coreset-max", type=int, default=400_000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for n in args.sizes:
        bank = clustered(n, args.dim, 0, "cpu")
        queries = clustered(args.queries, args.dim, 1, args.device)
        row_base = {"n": n, "dim": args.dim, "device": args.device}
        if n <= args.coreset_max:
            x = bank.to(args.device)
            sync(args.device)
            t0 = time.perf_counter()
            idx = greedy_coreset(x, args.coreset_ratio, projection_dim=128, seed=0)
            sync(args.device)
            rows.append({**row_base, "what": f"greedy coreset {args.coreset_ratio:g}", "seconds": round(time.perf_counter() - t0, 2), "selected": int(idx.numel())})
            print(rows[-1], flush=True)
            del x
        exact_idx = None
        for spec in args.backends:
            backend, index = spec.split(":")
            mb = MemoryBank(backend=backend, index=index).to(args.device if backend == "torch" else "cpu")
            t0 = time.perf_counter()
            mb.set_bank(bank)
            if backend == "faiss":
                mb._faiss_index(mb.bank.device)  # build now so search time is search only
            build = time.perf_counter() - t0
            q = queries if backend == "torch" else queries.cpu()
            mb.search(q[:64], 1)  # warm-up
            sync(args.device)
            t0 = time.perf_counter()
            _, idx = mb.search(q, 1)
            sync(args.device)
            secs = time.perf_counter() - t0
            idx = idx[:, 0].cpu()
            if exact_idx is None and index == "flat":
                exact_idx = idx
            recall = float((idx == exact_idx).float().mean()) if exact_idx is not None else None
            rows.append({**row_base, "what": f"search {spec}", "build_seconds": round(build, 2),
                         "queries_per_second": round(args.queries / secs, 1), "recall_at_1": recall})
            print(rows[-1], flush=True)
            del mb
        del bank
    rows.append({"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})
    print("\n| N | what | seconds / build s | queries/s | recall@1 |\n|---|---|---|---|---|")
    for r in rows[:-1]:
        print(f"| {r['n']:,} | {r['what']} | {r.get('seconds', r.get('build_seconds'))} | {r.get('queries_per_second', '-')} | {r.get('recall_at_1', '-')} |")
    print(f"peak RSS {rows[-1]['peak_rss_mb']} MB")
    if args.out:
        json.dump(rows, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
