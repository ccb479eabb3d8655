"""PatchCore's two patch descriptors on random features of WRN50's and EfficientNet-Lite0's layer2 +
layer3 shapes: the default (each layer 3x3-averaged, concatenated) against the official code's
(``method.embed_dims=[1024,1024]``, methods/patchcore/mean_mapper.py). CPU milliseconds per image.

    PYTHONPATH=src .venv/bin/python benchmarks/patch_descriptor.py [--threads 2] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from adtrain.methods.patch_features import pooled_concat
from adtrain.methods.patchcore.mean_mapper import mean_mapped

SHAPES = {"wide_resnet50_2 at 224": ((512, 28), (1024, 14)), "efficientnet_lite0 at 256": ((40, 32), (112, 16))}


def timed(fn, repeat: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, ((c2, s2), (c3, s3)) in SHAPES.items():
        feats = {"layer2": torch.randn(args.batch, c2, s2, s2, generator=g),
                 "layer3": torch.randn(args.batch, c3, s3, s3, generator=g)}
        layers = ["layer2", "layer3"]
        for kind, fn in (("concatenated", lambda: pooled_concat(feats, layers, 3)),
                         ("official [1024, 1024]", lambda: mean_mapped(feats, layers, 3, (1024, 1024)))):
            dims = int(fn().shape[1])
            ms = 1e3 * timed(fn, args.repeat) / args.batch
            out[f"{name}, {kind}"] = {"dims": dims, "ms_per_image": round(ms, 2)}
            print(f"{name:<28} {kind:<22} {dims:>5} dims {ms:8.2f} ms/image", flush=True)
    print(json.dumps({"threads": args.threads, "batch": args.batch, "results": out}))


if __name__ == "__main__":
    main()
