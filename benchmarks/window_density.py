"""How many bank items each query must re-rank exactly for its nearest item to be proven.

    PYTHONPATH=src python benchmarks/window_density.py RUN_DIR [--images 4]

RUN_DIR: a finished PatchCore run. Embeds its first --images test images and, for the fp32 pass
(CPU) and the fp16 pass (CUDA's default), both centred on the bank's mean with per-pair bounds
(``lowp.pair_bound``), counts per query the items whose lower bound is at or below the smallest
upper bound: every one of them can be the nearest item, so the certified search re-ranks them
all exactly (or searches the query again in full when they exceed its candidates). Prints the
mean nearest squared distance, the mean window 2 eps and the count's mean, 90th percentile and
maximum, and the shares of queries over 33 and 256 items (``certified_nearest``'s ``cap`` and
its block guard: past them a query is searched again in full fp32): device-independent arithmetic, so a CPU measures what a GPU's pass faces.
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--images", type=int, default=4)
    args = ap.parse_args()
    from _timing import run_patch_queries

    from adtrain.memory.lowp import pair_bound, pair_eps

    method, cfg, _, q = run_patch_queries(args.run_dir, args.images)
    bank = method.model.memory.bank.float()
    cen = bank.mean(0)
    qc, bc = q - cen, bank - cen
    qn, mn = qc.norm(dim=1), bc.norm(dim=1)
    out = {"run_dir": args.run_dir, "backbone": str(cfg.backbone.name), "bank": list(bank.shape),
           "queries": q.shape[0]}
    nearest = []
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        bound = pair_bound(q.shape[1], dtype)
        need, window = [], []
        for s in range(0, q.shape[0], 512):
            qq, qk = qc[s: s + 512], qn[s: s + 512].unsqueeze(1)
            d = (qq * qq).sum(1, keepdim=True) + (bc * bc).sum(1) - 2 * (qq.to(dtype) @ bc.to(dtype).t()).float()
            eps = pair_eps(qk, mn, bound)
            upper_min = (d + eps).min(dim=1).values
            need.append(((d - eps) <= upper_min.unsqueeze(1)).sum(dim=1).float())
            window.append((2 * eps).mean(dim=1))
            if name == "fp32":
                nearest.append(torch.cdist(q[s: s + 512], bank).min(dim=1).values.square())
        need = torch.cat(need)
        out[name] = {"window_2eps_mean": float(torch.cat(window).mean()), "items_in_window_mean": round(float(need.mean()), 2),
                     "p90": float(need.quantile(0.9)), "max": int(need.max()),
                     # lowp_nearest's candidates per query before a full fp32 search, and its block guard
                     "share_over_33": round(float((need > 33).float().mean()), 4),
                     "share_over_256": round(float((need > 256).float().mean()), 4)}
    out["nearest_squared_distance_mean"] = float(torch.cat(nearest).mean())
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
