"""Peak RSS of one process that builds a FAISS index over an N x D bank and searches it once: the
memory a build holds beside the bank (a bank's own figure, unlike memory_bank.py's, whose exact
reference search dominates its peak). CPU; prints one line.
    .venv/bin/python benchmarks/bank_build_rss.py --index flat --rows 100000 --dim 1536"""

import argparse
import resource

import torch

from adtrain.memory import MemoryBank


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--index", default="flat", choices=["flat", "ivf", "hnsw", "ivfpq"])
    ap.add_argument("--rows", type=int, default=100000)
    ap.add_argument("--dim", type=int, default=1536)
    args = ap.parse_args()
    torch.manual_seed(0)
    bank = MemoryBank(backend="faiss", index=args.index)
    for start in range(0, args.rows, 16384):  # fed as a run feeds it: batch by batch
        bank.add(torch.randn(min(16384, args.rows - start), args.dim) + 5.0)
    bank.build()
    bank.search(torch.randn(256, args.dim) + 5.0, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"index {args.index}: bank {args.rows} x {args.dim} ({args.rows * args.dim * 4 / 2**20:.0f} MB fp32), "
          f"peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
