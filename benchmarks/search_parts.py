"""Where a memory-bank method's test time goes, per image, on one batch of a finished run's test set.

    PYTHONPATH=src .venv/bin/python benchmarks/search_parts.py RUN_DIR [--repeat 3] [--batch 32]

RUN_DIR is a PatchCore or CFA run directory (e.g. `python -m adtrain.bench ... bench.run_dir=DIR`,
or one that `benchmarks/vs_anomalib.py` leaves in its workdir). On one test batch it times, in
milliseconds per image (median of --repeat): the backbone, `pooled_concat` channels-last (today)
and NCHW (before 2026-12-04), CFA's descriptor, and the exact k-NN search with
`memory.projection=off` (the dense fp32 pass) and `auto` (the projected pass, when the bank's
spectrum allows it); for k = 1 without a subspace also the sorted dense pass that the unsorted
one (`dense_exact.dense_nearest`) replaced; then it checks that the searches return the same
neighbours and distances and that both pooled layouts give the same values, bit for bit. It
prints one JSON object.
"""

from __future__ import annotations

import json
import statistics
import time

import torch
import torch.nn.functional as F

from _timing import run_batch_cli
from adtrain.methods.patch_features import pooled_concat


def pooled_concat_nchw(feats, layers, pool_size):
    """pooled_concat as it was before channels-last (the comparison's 'before')."""
    out, grid = [], None
    for name in layers:
        f = feats[name].float().contiguous()
        if pool_size > 1:
            f = F.avg_pool2d(f, pool_size, stride=1, padding=pool_size // 2)
        if grid is None:
            grid = f.shape[-2:]
        elif f.shape[-2:] != grid:
            f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
        out.append(f)
    return torch.cat(out, dim=1)


def timed(fn, repeat: int, n_images: int) -> tuple[float, object]:
    out = fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return round(1000 * statistics.median(times) / n_images, 2), out


def main() -> None:
    args, method, cfg, _, batch = run_batch_cli(__doc__, repeat_flag="--repeat", repeat=3)
    model = method.model
    n = int(batch["image"].shape[0])
    res = {"run_dir": args.run_dir, "method": str(cfg.method.name), "backbone": str(cfg.backbone.name),
           "images": n, "threads": torch.get_num_threads(), "ms_per_image": {}}
    ms = res["ms_per_image"]
    k = int(getattr(model, "K", 1))
    with torch.inference_mode():
        x = method.model_input(batch["image"])
        ms["backbone"], feats = timed(lambda: model.extractor(x), args.repeat, n)
        ms["pooled_concat_channels_last"], pooled = timed(
            lambda: pooled_concat(feats, model.layers, model.pool_size), args.repeat, n)
        ms["pooled_concat_nchw_before"], pooled_old = timed(
            lambda: pooled_concat_nchw(feats, model.layers, model.pool_size), args.repeat, n)
        res["pooled_layouts_identical"] = bool(torch.equal(pooled, pooled_old))
        emb = pooled
        if hasattr(model, "descriptor"):
            ms["descriptor"], emb = timed(lambda: model.descriptor(pooled), args.repeat, n)
        elif hasattr(model, "embed"):
            emb = model.embed(x)
        q = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
        bank = model.memory
        res.update(queries=int(q.shape[0]), bank=list(bank.bank.shape), k=k)
        found = {}
        for mode in ("off", "auto"):
            bank.projection = mode
            bank._invalidate()
            proj = bank._projection()
            res[f"subspace_dim_{mode}"] = proj.dim if proj is not None else None
            ms[f"search_projection_{mode}"], found[mode] = timed(lambda: bank.search(q, k), args.repeat, n)
        res["searches_identical"] = bool(torch.equal(found["off"][0], found["auto"][0])
                                         and torch.equal(found["off"][1], found["auto"][1]))
        if k == 1 and res["subspace_dim_auto"] is None and bank.dense_exact(q, q.device):
            # k = 1 takes dense_exact.dense_nearest (no sort); the sorted pass it replaced, for comparison
            from adtrain.memory.bank import DENSE_PAD, rerank
            from adtrain.memory.dense_exact import dense_certified_search

            ms["search_sorted_pass_before"], before = timed(
                lambda: dense_certified_search(q, bank.bank, 1, DENSE_PAD, rerank, bank._bank_max_norm()),
                args.repeat, n)
            res["sorted_pass_identical"] = bool(torch.equal(before[0], found["auto"][0])
                                                and torch.equal(before[1], found["auto"][1]))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
