"""CPU inference of a finished run, three ways, on one test batch (issue 14): what chunking the
forward (`inference.cpu_chunk_pixels`) and the TF-padding strips (`adtrain.backbones.same_pad`)
each bring.

    PYTHONPATH=src .venv/bin/python benchmarks/inference_parts.py RUN_DIR [--batch 32] [--rounds 6]

RUN_DIR is any run directory (e.g. one `benchmarks/vs_anomalib.py` leaves in its workdir). The
variants, alternated round by round in one process (this machine's load drifts), in
milliseconds per image (median and minimum over the rounds) of `method.anomaly_output` on the
batch:
- `whole_batch_padded`: one model call on the whole batch, timm's pad-then-convolve (before);
- `chunked_padded`: calls of at most `cpu_chunk_pixels` input pixels, timm's padding;
- `chunked_strips`: chunks and the strips (today's default).
It checks that the three give the same maps and scores, bit for bit, and prints one JSON object.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from _timing import run_batch_cli
from adtrain.backbones.same_pad import StripConv2dSame


def set_strips(method, on: bool, timm_class) -> None:
    """Switch the inference copies' TF-same convolutions between strips and timm's padding."""
    for mod in method.modules():
        copy = getattr(mod, "_fused", {}).get("model") if hasattr(mod, "_fused") else None
        if copy is None:
            continue
        for m in copy.modules():
            if isinstance(m, (StripConv2dSame, timm_class)):
                m.__class__ = StripConv2dSame if on else timm_class


def main() -> None:
    from timm.layers.conv2d_same import Conv2dSame

    args, method, cfg, _, batch = run_batch_cli(__doc__)
    chunk = method.cpu_chunk_pixels
    variants = {"whole_batch_padded": (0, False), "chunked_padded": (chunk, False), "chunked_strips": (chunk, True)}
    times = {v: [] for v in variants}
    outs = {}
    with torch.inference_mode():
        x = method.model_input(batch["image"])
        n = int(x.shape[0])
        method.anomaly_output(x[:1])  # builds the inference copies
        for r in range(args.rounds + 1):
            for name, (px, strips) in variants.items():
                method.cpu_chunk_pixels = px
                set_strips(method, strips, Conv2dSame)
                t = time.perf_counter()
                out = method.anomaly_output(x)
                if r:  # round 0 warms every variant up
                    times[name].append(1000 * (time.perf_counter() - t) / n)
                outs[name] = out
    ref = outs["whole_batch_padded"]
    res = {"run_dir": args.run_dir, "method": str(cfg.method.name), "backbone": str(cfg.backbone.name),
           "images": n, "image_size": list(x.shape[-2:]), "cpu_chunk_pixels": chunk,
           "threads": torch.get_num_threads(), "rounds": args.rounds,
           "ms_per_image_median": {k: round(statistics.median(v), 1) for k, v in times.items()},
           "ms_per_image_min": {k: round(min(v), 1) for k, v in times.items()},
           "identical": {k: bool(torch.equal(o.anomaly_map, ref.anomaly_map) and torch.equal(o.pred_score, ref.pred_score))
                         for k, o in outs.items()}}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
