"""How wide the certified low-precision search re-ranks, on a PatchCore run's real bank.

    python benchmarks/lowp_rerank_width.py RUN_DIR [--images 4] [--dtype float16]

RUN_DIR: a finished PatchCore run (any data and backbone; its checkpoint and config are used).
Embeds the first --images test images and runs ``memory.lowp.certified_pass`` (the pass
``distance_dtype=float16`` takes on CUDA; here on the CPU, so its own time is not a GPU figure)
with the bank's mean as the centre and without it. Prints the share of queries certified and
how many candidates each certified query needs re-ranked exactly (lower bound at or below the
k-th upper bound), against the k + pad the search re-ranked before (all kept candidates), and
times both re-rankings on this machine; both give the same neighbours (checked). ``old`` is the
certificate before 2026-12-04 on the same queries: one bound per query from the bank's largest
norm (``lowp.error_bound``), raw (uncentred) fp16 distances, the k + pad smallest kept.
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
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    args = ap.parse_args()
    from adtrain.build import build_datamodule
    from adtrain.loading import load_method
    from adtrain.memory.bank import LOWP_PAD, rerank
    from adtrain.memory.dense_exact import certified_rerank
    from adtrain.memory.lowp import certified_pass, error_bound

    method, cfg, _ = load_method(f"{args.run_dir}/checkpoints/model.ckpt")
    method.eval()
    bank = method.model.memory.bank.float()
    dm = build_datamodule(cfg)
    x = next(iter(dm.test_dataloader()))["image"][: args.images]
    x = dm.input_normalizer(x) if x.dtype == torch.uint8 else x
    with torch.no_grad():
        emb = method.model.embed(x)
    q = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]).float()
    dtype = getattr(torch, args.dtype)
    out = {"bank": list(bank.shape), "queries": q.shape[0], "dtype": args.dtype}
    approx = ((q * q).sum(1, keepdim=True) + (bank * bank).sum(1) - 2 * (q.to(dtype) @ bank.to(dtype).t()).float())
    top = approx.topk(LOWP_PAD + 10, dim=1, largest=False).values
    eps = error_bound(q.norm(dim=1), float(bank.norm(dim=1).max()), q.shape[1], dtype)
    nearest = torch.cdist(q, bank).min(dim=1).values.square()
    for k in (1, method.model.num_neighbors):
        kc = k + LOWP_PAD
        old_ok = top[:, kc] > top[:, k - 1] + 2 * eps
        out[f"k{k}_old"] = {"certified": round(float(old_ok.float().mean()), 4)}
        print(f"k={k} old: {out[f'k{k}_old']}", flush=True)
    out["old_2eps_over_nearest_sq"] = round(float((2 * eps).mean() / nearest.mean()), 2)
    print("old bound 2 eps / nearest squared distance (means):", out["old_2eps_over_nearest_sq"])
    for k in (1, method.model.num_neighbors):
        for name, center in (("raw", None), ("centred", bank.mean(0))):
            cand, low, thr = certified_pass(q, bank, k, LOWP_PAD, dtype, 16384, 65536, "cpu", center)
            kc = cand.shape[1] - 1
            ok = torch.isfinite(low).all(1) & (low[:, kc] > thr)
            need = (low[:, :kc] <= thr.unsqueeze(1)).sum(1)[ok].float()
            t0 = time.perf_counter()
            d_all, i_all = rerank(q[ok], bank, cand[ok, :kc], k)
            t_all = time.perf_counter() - t0
            t0 = time.perf_counter()
            d_new, i_new = certified_rerank(q[ok], bank, cand[ok], low[ok], k, None, rerank, thr=thr[ok])
            t_new = time.perf_counter() - t0
            out[f"k{k}_{name}"] = {
                "certified": round(float(ok.float().mean()), 4),
                "reranked_per_query_before": kc, "reranked_per_query_mean": round(float(need.mean()), 2),
                "reranked_per_query_max": int(need.max()) if need.numel() else 0,
                "rerank_all_ms": round(1000 * t_all, 1), "rerank_needed_ms": round(1000 * t_new, 1),
                "same_neighbours": bool(torch.equal(i_all, i_new) and torch.equal(d_all, d_new))}
            print(f"k={k} {name}: {out[f'k{k}_{name}']}", flush=True)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
