"""Memory bank figures: coreset build time and k-NN search throughput versus bank size.

    python benchmarks/memory_bank.py [--sizes 10000 100000 1000000] [--dim 1536] [--queries 4096]
        [--backends faiss:flat faiss:ivf faiss:hnsw faiss:ivfpq torch:flat torch:host]
        [--device cpu|cuda] [--coreset-ratio 0.1] [--coreset-max 400000]

Random Gaussian data (clustered, so approximate indexes have structure to exploit). For each
size: greedy coreset time (ratio of N, on --device; skipped above --coreset-max), then for each
backend: index build seconds, search queries/s (k=1) and recall@1 against the exact search.
``torch:flat`` keeps the bank on --device; ``torch:host`` keeps it in pinned host memory and
streams it to the GPU slice by slice (``memory.keep_on_host=true``): GPU memory is then bounded
by the slices. With --device cuda the data are generated on the GPU, and each row reports the
peak GPU memory allocated during that step. Prints a markdown table; --out FILE also writes JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from _timing import peak_gpu_mb, reset_peak, sync
from adtrain.memory import MemoryBank, greedy_coreset


def clustered(n: int, dim: int, seed: int, device, out_device=None, pin: bool = False) -> torch.Tensor:
    """n points around 256 Gaussian centres, generated on ``device`` in slices and stored on
    ``out_device`` (default ``device``; ``pin`` = pinned host memory)."""
    out_device = torch.device(out_device or device)
    g = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(256, dim, generator=g, device=device) * 4
    out = torch.empty(n, dim, device=out_device, pin_memory=pin and out_device.type == "cpu")
    for s in range(0, n, 262_144):
        e = min(n, s + 262_144)
        idx = torch.randint(0, 256, (e - s,), generator=g, device=device)
        out[s:e] = centres[idx] + torch.randn(e - s, dim, generator=g, device=device)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--queries", type=int, default=4096)
    ap.add_argument("--backends", nargs="+", default=["faiss:flat", "faiss:ivf", "faiss:hnsw", "faiss:ivfpq", "torch:flat"])
    ap.add_argument("--bank-chunk", type=int, default=4096, help="memory.bank_chunk: bank rows per slice")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--coreset-ratio", type=float, default=0.1)
    ap.add_argument("--coreset-max", type=int, default=400_000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    host_only = all(spec.endswith(":host") or spec.startswith("faiss") for spec in args.backends)
    for n in args.sizes:
        on_gpu = torch.device(args.device).type == "cuda"
        # the bank is made where the backends need it: on the GPU unless every backend wants the host
        bank_dev = args.device if on_gpu and not host_only else "cpu"
        bank = clustered(n, args.dim, 0, args.device if on_gpu else "cpu", bank_dev, pin=on_gpu)
        queries = clustered(args.queries, args.dim, 1, args.device)
        row_base = {"n": n, "dim": args.dim, "device": args.device}
        if n <= args.coreset_max:
            reset_peak(args.device)
            sync(args.device)
            t0 = time.perf_counter()  # features stay where they are; only the projection goes to --device
            idx = greedy_coreset(bank, args.coreset_ratio, projection_dim=128, seed=0, device=args.device)
            sync(args.device)
            rows.append({**row_base, "what": f"greedy coreset {args.coreset_ratio:g}", "seconds": round(time.perf_counter() - t0, 2),
                         "selected": int(idx.numel()), "peak_gpu_mb": peak_gpu_mb(args.device)})
            print(rows[-1], flush=True)
        exact_idx = None
        for spec in args.backends:
            backend, index = spec.split(":")
            host = index == "host"
            index = "flat" if host else index
            reset_peak(args.device)
            mb = MemoryBank(backend=backend, index=index, keep_on_host=host, bank_chunk=args.bank_chunk)
            mb = mb.to(args.device if backend == "torch" else "cpu")
            t0 = time.perf_counter()
            mb.set_bank(bank if backend == "torch" and not host else bank.cpu())
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
                         "queries_per_second": round(args.queries / secs, 1), "recall_at_1": recall,
                         "peak_gpu_mb": peak_gpu_mb(args.device)})
            print(rows[-1], flush=True)
            del mb
        del bank
    rows.append({"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})
    print("\n| N | what | seconds / build s | queries/s | recall@1 | peak GPU MB |\n|---|---|---|---|---|---|")
    for r in rows[:-1]:
        print(f"| {r['n']:,} | {r['what']} | {r.get('seconds', r.get('build_seconds'))} | {r.get('queries_per_second', '-')} "
              f"| {r.get('recall_at_1', '-')} | {r.get('peak_gpu_mb') or '-'} |")
    print(f"peak RSS {rows[-1]['peak_rss_mb']} MB")
    if args.out:
        json.dump(rows, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
