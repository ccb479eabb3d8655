"""Time a finished PatchCore run's own memory-bank search on its test images' patch features.

    PYTHONPATH=src python benchmarks/bank_search_run.py RUN_DIR [--images 4] [--k 1] [--backend faiss]

Embeds the first --images test images (the run's backbone and pooling), then times
``MemoryBank.search(queries, k)`` on this machine with the given backend (``faiss``: the flat
FAISS pass + its certificate; ``torch``: the torch passes), after one warm-up search that builds
the index. Counts the queries the certificate left to the full fp32 re-search
(``lowp.exact_search``) and the exact re-ranking's work (queries x candidates). Checks the
neighbours against brute-force fp32 differences. Prints one JSON object, so two checkouts
(before / after a change) can be compared on the same run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--backend", default="faiss", choices=["faiss", "torch", "auto"])
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    import adtrain.memory.bank_search as bank_mod  # where MemoryBank.search looks rerank and exact_search up
    import adtrain.memory.dense_exact as dense_exact
    from _timing import run_patch_queries

    from adtrain.memory.index import exact_distances

    method, cfg, _, q = run_patch_queries(args.run_dir, args.images)
    mem = method.model.memory
    mem.backend = args.backend
    mem._invalidate()
    counts = {"redone": 0, "reranked": 0}
    real_rerank, real_exact = bank_mod.rerank, dense_exact.exact_search

    def rerank(qq, b, cand, k, device=None):
        counts["reranked"] += cand.shape[0] * cand.shape[1]
        return real_rerank(qq, b, cand, k, device)

    def exact(qq, *a, **kw):
        counts["redone"] += qq.shape[0]
        return real_exact(qq, *a, **kw)

    mem.search(q[:64], args.k)  # builds the index
    bank_mod.rerank, dense_exact.exact_search = rerank, exact
    bank_mod.exact_search = exact
    try:
        times = []
        for _ in range(args.repeat):
            counts.update(redone=0, reranked=0)
            t0 = time.perf_counter()
            d, idx = mem.search(q, args.k)
            times.append(time.perf_counter() - t0)
    finally:
        bank_mod.rerank, dense_exact.exact_search, bank_mod.exact_search = real_rerank, real_exact, real_exact
    bank = mem.bank.float()
    sample = torch.arange(0, q.shape[0], max(1, q.shape[0] // 256))
    full = exact_distances(q[sample], bank, torch.arange(len(bank)).expand(len(sample), -1))
    rd, ri = torch.sort(full, dim=1, stable=True)
    out = {"run_dir": args.run_dir, "bank": list(bank.shape), "queries": q.shape[0], "k": args.k,
           "backend": args.backend, "threads": torch.get_num_threads(),
           "seconds": round(min(times), 3), "queries_per_second": round(q.shape[0] / min(times)),
           "redone_by_full_fp32_search": counts["redone"], "reranked_per_query": round(counts["reranked"] / q.shape[0], 2),
           "sample_equal_to_reference": bool(torch.equal(idx[sample], ri[:, : args.k])
                                             and torch.equal(d[sample], rd[:, : args.k]))}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
