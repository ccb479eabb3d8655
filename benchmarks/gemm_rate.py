"""The rate of the certified search's distance GEMM at PatchCore's shape, in its variants.

    python benchmarks/gemm_rate.py [--device cuda] [--queries 7456] [--items 36044] [--dim 1544]

On the H200 (call 3, docs/BENCHMARKS.md) the fp16 distance GEMMs of PatchCore's search ran at
about 218 TFLOP/s (a CUTLASS sm80 kernel), a fraction of the card's dense fp16 rate, at a shape
whose item count (36,044) is not a multiple of 8. This times the product of one block
(``--queries`` x ``--dim`` against ``--items`` x ``--dim``, the default: one block of
``lowp_nearest.certified_nearest`` on that bank) in each form the code could take, so one device
call says which is fastest:

- ``addmm_out_fp32``: ``addmm(bias, q, m.t(), out_dtype=float32)``, the k = 1 pass on CUDA now;
- ``mm_fp16_then_add``: the fp16 product, widened and the bias added (the fallback, ``lowp``);
- ``addmm_out_fp32_padded``: the first with the items padded to a multiple of 128;
- ``addmm_out_fp32_bcontig``: the first with the items' side stored (dim, items) contiguous;
- ``mm_fp32``: the fp32 product (TF32 off), the full re-search's GEMM.

Prints milliseconds (median of --repeat, synchronised) and TFLOP/s per variant; on a CPU use small
sizes (the half-precision forms run there too, slowly).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def timed(fn, repeat: int, sync) -> float:
    fn()
    sync()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--queries", type=int, default=7456)
    ap.add_argument("--items", type=int, default=36044)
    ap.add_argument("--dim", type=int, default=1544)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device=dev).manual_seed(0)
    q32 = torch.randn(args.queries, args.dim, generator=g, device=dev)
    m32 = torch.randn(args.items, args.dim, generator=g, device=dev)
    bias32 = torch.randn(args.items, generator=g, device=dev)
    q, m = q32.half(), m32.half()
    pad = -(-args.items // 128) * 128
    m_pad = torch.zeros(pad, args.dim, device=dev, dtype=torch.float16)
    m_pad[: args.items] = m
    bias_pad = torch.full((pad,), float("inf"), device=dev)
    bias_pad[: args.items] = bias32
    m_kn = m.t().contiguous()  # (dim, items)

    def addmm(bias, b):
        return torch.addmm(bias.unsqueeze(0), q, b, out_dtype=torch.float32)

    variants = {
        "addmm_out_fp32": lambda: addmm(bias32, m.t()),
        "mm_fp16_then_add": lambda: (q @ m.t()).float().add_(bias32),
        "addmm_out_fp32_padded": lambda: addmm(bias_pad, m_pad.t()),
        "addmm_out_fp32_bcontig": lambda: addmm(bias32, m_kn),
        "mm_fp32": lambda: q32 @ m32.t(),
    }
    flop = 2.0 * args.queries * args.items * args.dim
    ref = (q32.half().float() @ m32.half().float().t()) + bias32
    results = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               "shape": [args.queries, args.items, args.dim], "variants": {}}
    for name, fn in variants.items():
        try:
            ms = timed(fn, args.repeat, sync)
            out = fn()[:, : args.items]
            err = None if name == "mm_fp32" else float((out.float() - ref).abs().max() / ref.abs().max())
            results["variants"][name] = {"ms": round(ms, 3), "tflops": round(flop / ms / 1e9, 1), "max_rel_err": err}
        except (RuntimeError, TypeError, NotImplementedError) as e:  # e.g. out_dtype on an older torch
            results["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
        print(name, results["variants"][name], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
