"""The export graph's resize (adtrain.data.resize.resize_tensor) of this tree against another
tree's (an earlier commit's, e.g. a `git worktree`), on the same uint8 batch, as each graph gets it.

    git worktree add /tmp/old_wt <commit>
    .venv/bin/python benchmarks/graph_resize_ab.py --old-src /tmp/old_wt/src [--sizes 1024 300] [--to 256]
        [--batch 8] [--threads 2] [--old-float]

Asserts both give the same tensor, then prints a markdown row per source size and rule: best of 7
rounds of 5 calls, ms per image, old and new, and the ratio. --old-float feeds the old side
``x.float()`` first, as graphs before the uint8 input of resize_tensor did.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np
import torch


def load(src: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, src / "adtrain" / "data" / "resize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def best_ms(f, rounds: int = 7, n: int = 5) -> float:
    f()
    runs = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        runs.append((time.perf_counter() - t0) / n * 1e3)
    return min(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-src", required=True, type=Path)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 300])
    ap.add_argument("--to", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--old-float", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    old = load(args.old_src, "old_resize")
    new = load(Path(__file__).resolve().parents[1] / "src", "new_resize")
    size, b = (args.to, args.to), args.batch
    print("| source -> size | rule | old ms/image | new ms/image | old / new |")
    print("|---|---|---|---|---|")
    for src in args.sizes:
        rgb = np.random.default_rng(0).integers(0, 256, (b, src, src, 3), dtype=np.uint8)
        x = torch.from_numpy(rgb).permute(0, 3, 1, 2)  # uint8 NHWC seen as NCHW, as the graph gets it
        for rule in new.RULES:
            def run_old():
                return old.resize_tensor(x.float() if args.old_float else x, size, rule)

            def run_new():
                return new.resize_tensor(x, size, rule)

            assert torch.equal(run_old().float(), run_new()), rule
            t_old, t_new = best_ms(run_old), best_ms(run_new)
            print(f"| {src} x {src} -> {args.to} | {rule} | {t_old / b:.2f} | {t_new / b:.2f} | {t_old / t_new:.1f}x |")


if __name__ == "__main__":
    main()
