"""Images/s of an exported model in each runtime (CPU) against the PyTorch path, same checkpoint.

    python benchmarks/export_speed.py --checkpoint RUN/checkpoints/model.ckpt [--batch-size 8]
        [--batches 10] [--threads 2] [--formats onnx torchscript openvino] [--profile] [--out FILE]

All sides score the same uint8 images already at the run's image_size (no file reading):
PyTorch path = the run's eval transform (albumentations) + `predict_step` of the loaded method,
eager, on the CPU; each format = one call of `adtrain-export format=F` (preprocessing, model,
threshold and display map in the graph): ONNX Runtime's CPUExecutionProvider, TorchScript
(frozen), OpenVINO's CPU plugin in f32, each opened by `adtrain.export.formats.open_export` as
`adtrain.Detector` and adtrain-predict open it.
Three warm-up batches each (a path's first calls run slower), then the median batch time of
--batches batches. Every runtime gets the same thread count, and each export's scores are
checked against the PyTorch path's. --profile: after timing, torch's profiler over one batch of
the TorchScript export (its ops' share of the time, printed before the figures).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _open(open_export, path: Path, threads: int):
    """The export opened as adtrain.Detector and predict open it, with ``threads`` threads. An adtrain
    from before open_export's ``threads`` (an A/B run against an older commit) opens it with the
    runtimes' default, every core: the same count only where --threads is the machine's core count."""
    import inspect
    import os

    if "threads" in inspect.signature(open_export).parameters:
        return open_export(path, "cpu", threads=threads)
    if threads != os.cpu_count():
        print(f"note: this adtrain's open_export has no thread count: its runtimes use all {os.cpu_count()} cores")
    return open_export(path, "cpu")


VERSIONS = {"onnx": lambda: __import__("onnxruntime").__version__, "torchscript": lambda: torch.__version__,
            "openvino": lambda: __import__("openvino").__version__}


def median_seconds(fn, batches: int, warmup: int = 3) -> float:
    for _ in range(warmup):  # the first calls of a path run slower (its large buffers' first pages)
        fn()
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", nargs="+", default=["onnx", "torchscript", "openvino"],
                    choices=["onnx", "torchscript", "openvino"])
    ap.add_argument("--profile", action="store_true", help="profile one batch of the TorchScript export")
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = ap.parse_args()

    from adtrain.export import export
    from adtrain.export.formats import FORMATS, open_export
    from adtrain.inference.graph import run_preprocessing
    from adtrain.loading import load_method

    torch.set_num_threads(args.threads)
    method, cfg, _ = load_method(args.checkpoint)
    pre, transform = run_preprocessing(cfg)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch_size, *pre.image_size, 3), dtype=np.uint8)

    def torch_path():
        x = torch.stack([transform(image=im)["image"] for im in images]).float()
        return method.predict_step(x)

    torch_s = median_seconds(torch_path, args.batches)
    reference = torch_path()["score"].float().numpy()
    res = {"method": str(cfg.method.name), "image_size": list(pre.image_size), "batch_size": args.batch_size,
           "threads": args.threads, "torch": torch.__version__, "torch_images_per_s": round(args.batch_size / torch_s, 2)}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats:
            path = export(args.checkpoint, fmt, out=Path(tmp) / f"model{FORMATS[fmt]}")
            _, run = _open(open_export, path, args.threads)
            seconds = median_seconds(lambda: run(images), args.batches)
            score = np.asarray(run(images)["score"], dtype=np.float64)
            res[f"{fmt}_images_per_s"] = round(args.batch_size / seconds, 2)
            res[f"{fmt}_speedup"] = round(torch_s / seconds, 2)
            res[f"{fmt}_max_rel_score_diff"] = float(np.max(np.abs(score - reference) / np.maximum(np.abs(reference), 1e-12)))
            res[f"{fmt}_version"] = VERSIONS[fmt]()
            if args.profile and fmt == "torchscript":
                with torch.autograd.profiler.profile() as prof:
                    run(images)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    print(json.dumps(res))
    if args.out:
        from adtrain.io import write_json

        write_json(args.out, res)


if __name__ == "__main__":
    main()
