"""Which exact nearest-neighbour search is fastest for each shape on this device.

    python benchmarks/search_select.py [--device cpu|cuda] [--shapes M:N:D:K ...] [--repeat 3]
        [--lowp-on-cpu]

For each shape (M queries, N bank rows, D dims, k neighbours; the defaults are PatchCore's
and CFA's test-time searches on ELPV at 256x256 with EfficientNet-Lite0, plus PatchCore's
reweighting search) and each exact backend: FAISS flat (CPU FAISS; FAISS GPU when installed),
the chunked torch matmul search in fp32, and the certified low-precision passes (float16,
bfloat16: on CUDA, on the CPU only with --lowp-on-cpu) with their share of certified queries.
Every backend goes through MemoryBank.search (candidates + exact re-ranking), the neighbours
are checked equal to the fp32 torch search's, and the median of --repeat timed calls is
printed as a markdown table with the command that made it. Data: clustered Gaussians
(benchmarks/memory_bank.py), bank and queries from the same clusters.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch

from _timing import sync
from memory_bank import clustered
from adtrain.memory import MemoryBank
from adtrain.memory.index import faiss_available

#: PatchCore (32 images x 32x32 patches vs a 10 % coreset of 282 x 1024), its reweighting
#: search (32 queries, k=9), CFA (4 images x 28x28 vs 784 centres, k=3)
DEFAULT_SHAPES = ("32768:28876:152:1", "32:28876:152:9", "3136:784:248:3")


def backends(device: torch.device, lowp_on_cpu: bool) -> list[tuple[str, dict]]:
    out = [("torch fp32", {"backend": "torch", "distance_dtype": "float32"})]
    if faiss_available():
        out.append(("faiss flat", {"backend": "faiss", "distance_dtype": "float32"}))
    if device.type == "cuda" or lowp_on_cpu:
        out += [("torch fp16 certified", {"backend": "torch", "distance_dtype": "float16"}),
                ("torch bf16 certified", {"backend": "torch", "distance_dtype": "bfloat16"})]
    return out


def certified_share(bank: MemoryBank, queries: torch.Tensor, k: int) -> float | None:
    from adtrain.memory.bank import LOWP_PAD
    from adtrain.memory.lowp import certified_search

    low = bank.low_precision(queries, queries.device)
    if low is None:
        return None
    _, ok = certified_search(queries, bank.bank, k, LOWP_PAD, low, bank.search_chunk, bank.bank_chunk, queries.device)
    return float(ok.float().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="M:N:D:K")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--lowp-on-cpu", action="store_true", help="also time the fp16/bf16 passes on the CPU")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"command: python benchmarks/search_select.py {shlex.join(sys.argv[1:])}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print("\n| M x N x D, k | backend | ms per search | queries/s | certified | same neighbours |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes:
        m, n, d, k = (int(v) for v in shape.split(":"))
        data = clustered(n + m, d, 0, device)
        bank_rows, queries = data[:n], data[n:]
        ref = None
        for name, kwargs in backends(device, args.lowp_on_cpu):
            bank = MemoryBank(**kwargs).to(device)
            bank.set_bank(bank_rows)
            bank.search(queries[: min(m, 64)], k)  # warm-up (index build, kernels)
            times = []
            for _ in range(max(1, args.repeat)):
                sync(device)
                t0 = time.perf_counter()
                _, idx = bank.search(queries, k)
                sync(device)
                times.append(time.perf_counter() - t0)
            if name == "torch fp32":
                ref = idx
            same = "-" if ref is None else str(bool(torch.equal(idx.cpu(), ref.cpu())))
            share = certified_share(bank, queries, k) if "certified" in name else None
            sec = sorted(times)[len(times) // 2]
            print(f"| {m} x {n} x {d}, {k} | {name} | {sec * 1e3:.1f} | {m / sec:,.0f} | "
                  f"{'-' if share is None else f'{share:.1%}'} | {same} |")


if __name__ == "__main__":
    main()
