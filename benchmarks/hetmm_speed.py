"""HETMM model throughput: images/s at 256x256, full template set vs PTS K-sheet set, per dtype.

    python benchmarks/hetmm_speed.py [--backbone wide_resnet101_2] [--pretrained false]
        [--num-templates 242] [--k 60] [--batch-sizes 1 32] [--dtypes float32 bfloat16 float16]
        [--device cuda] [--pts-sizes 220 391] [--out FILE]

Times the model alone (images already on the device: backbone layers 1-3, ATMM forward and
backward matching, upsampling, image score), as the paper's FPS figure does. Speed does not
depend on the weights, so ``--pretrained false`` (random init) measures the paper's WRN101
where its ImageNet weights cannot be downloaded. Templates come from smooth random images
(N = --num-templates; 242 = the mean MVTec AD training-set size). Also times PTS (per-position
OPTICS) for each N in --pts-sizes (MVTec AD's training sets run from 60 to 391 images) and
reports the peak memory of every step (GPU: allocated by torch; CPU: process max RSS).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from _timing import peak_mb, reset_peak, sync
from adtrain.methods.hetmm.torch_model import HetmmModel

CONF = Path(__file__).resolve().parents[1] / "src" / "adtrain" / "conf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def images(n: int, size: int, device, seed: int) -> torch.Tensor:
    """Smooth random images, ImageNet-normalised scale (features with spatial structure)."""
    g = torch.Generator(device=device).manual_seed(seed)
    low = torch.randn(n, 3, size // 16, size // 16, generator=g, device=device)
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def set_templates(model: HetmmModel, sets: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    for name, t in sets.items():
        setattr(model, model._key(name), t.to(dtype))


@torch.no_grad()
def throughput(model, batch: torch.Tensor, dtype: torch.dtype, iters: int) -> float:
    dev = batch.device
    amp = torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32)
    model.compute_dtype = dtype
    with amp:
        for _ in range(2):
            model(batch)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(iters):
            model(batch)
        sync(dev)
    return batch.shape[0] * iters / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="wide_resnet101_2")
    ap.add_argument("--pretrained", default="false")
    ap.add_argument("--num-templates", type=int, default=242)
    ap.add_argument("--k", type=int, default=60)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    ap.add_argument("--chunk-size", type=int, default=64, help="method.chunk_size")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--pts-sizes", type=int, nargs="*", default=[])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    bb = OmegaConf.to_container(OmegaConf.load(CONF / "backbone" / f"{args.backbone}.yaml"))
    bb["pretrained"] = args.pretrained.lower() == "true"
    model = HetmmModel(backbone=bb, templates=args.k, chunk_size=args.chunk_size).to(dev).eval()
    rows: list[dict] = []
    # ---- template set (the "fit"): features of N normal images
    reset_peak(dev)
    t0 = time.perf_counter()
    for s in range(0, args.num_templates, 32):
        model.add_templates(images(min(32, args.num_templates - s), args.image_size, dev, seed=s))
    sync(dev)
    full = {name: model.template_set(name).clone() for name in model.layers}
    rows.append({"what": f"template features N={args.num_templates}", "seconds": round(time.perf_counter() - t0, 2),
                 "peak_mb": peak_mb(dev)})
    print(rows[-1], flush=True)
    # ---- PTS per category size
    for n in [*args.pts_sizes, args.num_templates]:
        if n == args.num_templates:
            sets = full
        else:  # other category sizes: the set repeated with a little noise, re-normalised
            reps = -(-n // args.num_templates)
            sets = {k: F.normalize(v.repeat(reps, 1, 1, 1)[:n] + 0.01 * torch.randn_like(v.repeat(reps, 1, 1, 1)[:n]), dim=1)
                    for k, v in full.items()}
        set_templates(model, sets, torch.float32)
        reset_peak(dev)
        sync(dev)
        t0 = time.perf_counter()
        model.compress(args.k)
        sync(dev)
        rows.append({"what": f"PTS N={n} -> K={args.k}", "seconds": round(time.perf_counter() - t0, 2),
                     "peak_mb": peak_mb(dev)})
        print(rows[-1], flush=True)
    tiny = {name: model.template_set(name).clone() for name in model.layers}
    # ---- scoring throughput
    for label, sets in (("all", full), (str(args.k), tiny)):
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            set_templates(model, sets, dtype)
            for bs in args.batch_sizes:
                batch = images(bs, args.image_size, dev, seed=10_000 + bs)
                reset_peak(dev)
                try:
                    ips = round(throughput(model, batch, dtype, args.iters), 1)
                except torch.OutOfMemoryError:
                    ips = "out of memory"
                rows.append({"what": f"score templates={label} ({sets[model.layers[0]].shape[0]} sheets)",
                             "dtype": dname, "batch": bs, "images_per_second": ips, "peak_mb": peak_mb(dev)})
                print(rows[-1], flush=True)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"\n{gpu}, torch {torch.__version__}, backbone {bb['name']} (pretrained={bb['pretrained']}), "
          f"{args.image_size}x{args.image_size}")
    print("| what | dtype | batch | images/s or seconds | peak MB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r.get('dtype', '-')} | {r.get('batch', '-')} | "
              f"{r.get('images_per_second', r.get('seconds'))} | {r['peak_mb']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": gpu, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
