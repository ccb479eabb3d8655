"""What bounds a method's model on a GPU: its parts timed with synchronising timers, then its kernels.

    python benchmarks/gpu_model_parts.py RUN_DIR [--batch 128] [--batches 4] [--top 20] [--out FILE]

RUN_DIR is a finished run (e.g. `python -m adtrain.bench ... bench.run_dir=DIR`). Its first
``--batches`` test batches of ``--batch`` real test images go to the GPU once (normalised there,
as in a test); then, under the run's precision (autocast), ``anomaly_output`` runs on them:

1. plainly (images/s of the model alone on real inputs, no data loading or metrics);
2. with synchronising timers around the model's parts (PatchCore / CFA: ``embed``,
   ``patch_distances``, ``image_score``, ``anomaly_map``), then, in another pass, around the
   memory's searches and inside them (the k = 1 pass, the exact re-rankings, the full fp32
   re-searches; each with its calls and query rows; a part inside another is counted in both);
3. under ``torch.profiler`` (CUDA kernels by their own GPU time, top ``--top``).

Prints one JSON object (and writes it to --out).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import ExitStack

import torch
from _timing import part_timers, sync_if_cuda as _sync


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    from adtrain.build import build_datamodule
    from adtrain.loading import load_method

    dev = torch.device(args.device)
    method, cfg, _ = load_method(f"{args.run_dir}/checkpoints/model.ckpt")
    method.eval().to(dev)
    dm = build_datamodule(cfg)
    dm.setup("test")
    loader = dm.make_dataloader(dm.test_samples[: args.batch * args.batches], train=False, batch_size=args.batch)
    images = []
    for batch in loader:
        batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        images.append(method.on_after_batch_transfer(batch, 0)["image"])
    n = sum(int(x.shape[0]) for x in images)
    precision = str(cfg.trainer.get("precision", "32"))
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)

    def run_all():
        with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            for x in images:
                method.anomaly_output(x)

    run_all()  # warm-up
    _sync()
    t0 = time.perf_counter()
    run_all()
    _sync()
    plain = time.perf_counter() - t0
    res = {"run_dir": args.run_dir, "method": str(cfg.method.name), "images": n, "batch": args.batch,
           "precision": precision, "model_images_per_second": round(n / plain, 1)}

    import adtrain.memory.bank_search as bank_mod  # where MemoryBank.search looks these names up
    import adtrain.memory.dense_exact as dense_exact
    import adtrain.memory.lowp_nearest as ln
    from adtrain.memory.bank import MemoryBank

    model = method.model
    targets = [(f"model.{name}", type(model), name) for name in
               ("embed", "patch_distances", "image_score", "anomaly_map", "reweight") if hasattr(type(model), name)]
    inner = [("search: MemoryBank.search", MemoryBank, "search"),
             ("k=1 pass: certified_nearest", bank_mod, "certified_nearest"),
             ("exact re-ranking of candidates (rows)", bank_mod, "rerank"),
             ("k=1 pass: full fp32 re-search (rows)", ln, "exact_search"),
             ("k>1: full fp32 re-search (rows)", dense_exact, "exact_search")]
    with part_timers(targets) as outer:
        _sync()
        t0 = time.perf_counter()
        run_all()
        _sync()
        timed = time.perf_counter() - t0
    with ExitStack() as stack:  # one context per part: each is timed even inside another
        found = [stack.enter_context(part_timers([t])) for t in inner]
        run_all()
    deep_t = {k: v for part in found for k, v in part.items()}
    res["timed_images_per_second"] = round(n / timed, 1)
    res["parts_ms_per_batch"] = {k: round(1000 * v[0] / args.batches, 2) for k, v in outer.items()}
    res["search_parts"] = {k: {"ms_per_batch": round(1000 * v[0] / args.batches, 2), "calls": v[1], "rows": v[2]}
                           for k, v in deep_t.items()}

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    with profile(activities=acts) as prof:
        run_all()
        _sync()
    table = prof.key_averages().table(sort_by=sort, row_limit=args.top, max_name_column_width=60)
    print(table)
    res["kernels_by_self_time"] = table
    print(json.dumps({k: v for k, v in res.items() if k != "kernels_by_self_time"}, indent=1))
    if args.out:
        from adtrain.io import write_json

        write_json(args.out, res)
    return res


if __name__ == "__main__":
    main()
