"""Images/s of an exported model in ONNX Runtime (CPU) against the PyTorch path, same checkpoint.

    python benchmarks/export_speed.py --checkpoint RUN/checkpoints/model.ckpt [--batch-size 8]
        [--batches 10] [--threads 2] [--out FILE]

Both sides score the same uint8 images already at the run's image_size (no file reading):
PyTorch path = the run's eval transform (albumentations) + `predict_step` of the loaded method,
eager, on the CPU; ONNX = one `session.run` of `adtrain-export format=onnx` (preprocessing, model,
threshold and display map in the graph), CPUExecutionProvider. One warm-up batch each, then the
median batch time of --batches batches. torch and ONNX Runtime get the same thread count.
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


def median_seconds(fn, batches: int) -> float:
    fn()  # warm-up
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
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = ap.parse_args()

    import onnxruntime as ort

    from adtrain.loading import load_method
    from adtrain.export import export
    from adtrain.inference.graph import run_preprocessing

    torch.set_num_threads(args.threads)
    method, cfg, _ = load_method(args.checkpoint)
    pre, transform = run_preprocessing(cfg)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch_size, *pre.image_size, 3), dtype=np.uint8)

    def torch_path():
        x = torch.stack([transform(image=im)["image"] for im in images]).float()
        return method.predict_step(x)

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export(args.checkpoint, "onnx", out=Path(tmp) / "model.onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        onnx_s = median_seconds(lambda: sess.run(None, {"images": images}), args.batches)
    torch_s = median_seconds(torch_path, args.batches)
    res = {
        "method": str(cfg.method.name), "image_size": list(pre.image_size), "batch_size": args.batch_size,
        "threads": args.threads, "torch_images_per_s": round(args.batch_size / torch_s, 2),
        "onnxruntime_images_per_s": round(args.batch_size / onnx_s, 2),
        "onnxruntime_speedup": round(torch_s / onnx_s, 2), "torch": torch.__version__, "onnxruntime": ort.__version__,
    }
    print(json.dumps(res))
    if args.out:
        from adtrain.io import write_json

        write_json(args.out, res)


if __name__ == "__main__":
    main()
