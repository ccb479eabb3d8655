"""Frozen extractor speed with and without batch-norm folding (`backbone.fuse_batchnorm`).

    python benchmarks/fuse_speed.py [--backbones efficientnet_lite0 resnet18] [--batch 32]
        [--size 256] [--repeat 3] [--device cpu]

Times the feature extractor alone (the layers PatchCore reads, on random input: speed does not
depend on the weights, so it runs random-init) with the batch norms as trained and folded into
the convolutions, alternately, and prints the median seconds per batch, images/s and the
largest relative difference of the features.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import adtrain
from _timing import sync
from adtrain.backbones import build_extractor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "resnet18"])
    ap.add_argument("--layers", nargs="+", default=["layer2", "layer3"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    for name in args.backbones:
        cfg = adtrain.compose(["method=patchcore", f"backbone={name}", "backbone.pretrained=false"]).backbone
        torch.manual_seed(0)
        plain = build_extractor({**cfg, "fuse_batchnorm": False}, args.layers, frozen=True).to(dev)
        fused = build_extractor({**cfg, "fuse_batchnorm": True}, args.layers, frozen=True).to(dev)
        fused.load_state_dict(plain.state_dict())
        x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
        times: dict[str, list[float]] = {"plain": [], "fused": []}
        with torch.inference_mode():
            outs = {"plain": plain(x), "fused": fused(x)}  # warm-up (and the folding itself)
            for _ in range(args.repeat):
                for label, ext in (("plain", plain), ("fused", fused)):
                    sync(dev)
                    t = time.perf_counter()
                    ext(x)
                    sync(dev)
                    times[label].append(time.perf_counter() - t)
        diff = max(float((outs["plain"][k] - outs["fused"][k]).abs().max() / outs["plain"][k].abs().max())
                   for k in outs["plain"])
        med = {k: statistics.median(v) for k, v in times.items()}
        print(json.dumps({
            "backbone": cfg["name"], "batch": args.batch, "size": args.size, "device": str(dev),
            "batch_norm_s": round(med["plain"], 3), "folded_s": round(med["fused"], 3),
            "batch_norm_img_s": round(args.batch / med["plain"], 1), "folded_img_s": round(args.batch / med["fused"], 1),
            "speed_up": round(med["plain"] / med["fused"], 2), "max_rel_diff": float(f"{diff:.2e}"),
            "batch_norms_folded": fused._fused.get("count", 0),
        }))


if __name__ == "__main__":
    main()
