"""The resized, blurred score maps of PatchCore, CFA and DFM, two ways, on one test batch of a
finished run: the map as it was made before (bilinear `interpolate` to the image size, then the
separable 33-tap Gaussian `conv2d` passes over every full-size map) against `upsampled_map` (the
same linear map as two small matrix products, `adtrain.methods.patch_features`).

    PYTHONPATH=src .venv/bin/python benchmarks/map_parts.py RUN_DIR [--batch 32] [--rounds 6]

The variants alternate round by round in one process (this machine's load drifts). Printed, in
milliseconds per image (median and minimum over the rounds): the map alone (from the run's own
patch scores, `map_only_*`) and the whole `method.anomaly_output` (`output_*`); the largest
difference between the two variants' maps (absolute, and relative to the map's largest value)
and whether their image scores are identical. One JSON object.
"""

from __future__ import annotations

import importlib
import json
import statistics
import time

import torch
import torch.nn.functional as F

from _timing import run_batch_cli
from adtrain.methods.patch_features import gaussian_blur2d, upsampled_map

MODULES = ("adtrain.methods.patchcore.torch_model", "adtrain.methods.cfa.torch_model",
           "adtrain.methods.dfm.torch_model")


def before(patch_scores: torch.Tensor, size, sigma: float, mode: str = "reflect") -> torch.Tensor:
    """The maps as they were made before `upsampled_map` (``mode``: the blur's borders, ``method.blur_mode``)."""
    s = patch_scores if patch_scores.ndim == 4 else patch_scores.unsqueeze(1)
    return gaussian_blur2d(F.interpolate(s.float(), size=tuple(size), mode="bilinear", align_corners=False),
                           sigma, mode)


def use(fn) -> None:
    for name in MODULES:
        importlib.import_module(name).upsampled_map = fn


def main() -> None:
    args, method, cfg, _, batch = run_batch_cli(__doc__)
    sigma = float(getattr(method.model, "blur_sigma", 4.0))
    variants = {"before": before, "upsampled_map": upsampled_map}
    times = {f"{part}_{v}": [] for part in ("map_only", "output") for v in variants}
    outs = {}
    with torch.inference_mode():
        x = method.model_input(batch["image"])
        n, size = int(x.shape[0]), tuple(x.shape[-2:])
        method.anomaly_output(x[:1])  # builds the inference copies
        grid = (size[0] // 8, size[1] // 8)  # the stride-8 patch grid of PatchCore / CFA / DFM
        scores = torch.rand(n, *grid, generator=torch.Generator().manual_seed(0)) * 30
        for r in range(args.rounds + 1):
            for name, fn in variants.items():
                use(fn)
                t = time.perf_counter()
                fn(scores, size, sigma)
                t1 = time.perf_counter()
                out = method.anomaly_output(x)
                t2 = time.perf_counter()
                if r:  # round 0 warms every variant up
                    times[f"map_only_{name}"].append(1000 * (t1 - t) / n)
                    times[f"output_{name}"].append(1000 * (t2 - t1) / n)
                outs[name] = out
    use(upsampled_map)
    a, b = outs["before"], outs["upsampled_map"]
    diff = float((a.anomaly_map - b.anomaly_map).abs().max())
    res = {"run_dir": args.run_dir, "method": str(cfg.method.name), "backbone": str(cfg.backbone.name),
           "images": n, "image_size": list(size), "map_grid": list(grid), "blur_sigma": sigma,
           "threads": torch.get_num_threads(), "rounds": args.rounds,
           "ms_per_image_median": {k: round(statistics.median(v), 2) for k, v in times.items()},
           "ms_per_image_min": {k: round(min(v), 2) for k, v in times.items()},
           "map_max_abs_difference": diff,
           "map_max_relative_difference": diff / max(float(a.anomaly_map.abs().max()), 1e-30),
           "image_scores_identical": bool(torch.equal(a.pred_score, b.pred_score))}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
