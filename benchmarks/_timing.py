"""Small helpers shared by the benchmark scripts: device sync and peak-memory bookkeeping."""

from __future__ import annotations

import resource
import statistics
import time
from contextlib import contextmanager

import torch


def median_ms(fn, repeat: int) -> float:
    """Median milliseconds of ``repeat`` calls of ``fn`` after one warm-up call (CPU timings)."""
    fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gpu_mb(device) -> float | None:
    """Peak GPU memory allocated by torch since the last reset_peak (None off the GPU)."""
    if torch.device(device).type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def peak_mb(device) -> float:
    """Peak GPU memory on a GPU, else the process's peak RSS."""
    gpu = peak_gpu_mb(device)
    return gpu if gpu is not None else round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_test_batch(run_dir: str, images: int):
    """(method in eval mode, its config, the datamodule, one batch): a finished run's model and
    its first ``images`` test images, as the test's loader gives them."""
    from adtrain.build import build_datamodule
    from adtrain.loading import load_method

    method, cfg, _ = load_method(f"{run_dir}/checkpoints/model.ckpt")
    method.eval()
    dm = build_datamodule(cfg)
    dm.setup("test")
    return method, cfg, dm, next(iter(dm.make_dataloader(dm.test_samples[:images], train=False)))


def run_batch_cli(doc: str, batch: int = 32, repeat_flag: str = "--rounds", repeat: int = 6, extra=None):
    """The command line shared by the one-batch scripts (RUN_DIR, --batch, a repeat count, and
    ``extra(parser)``'s own options), then ``run_test_batch``: (args, method, config, datamodule,
    batch)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument(repeat_flag, type=int, default=repeat)
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    return (args, *run_test_batch(args.run_dir, args.batch))


def run_patch_queries(run_dir: str, images: int):
    """(method in eval mode, its config, the datamodule, queries (M,D) fp32): the patch features of
    a finished run's first ``images`` test images, as its model embeds them."""
    method, cfg, dm, batch = run_test_batch(run_dir, images)
    x = batch["image"]
    x = dm.input_normalizer(x) if x.dtype == torch.uint8 else x
    with torch.no_grad():
        emb = method.model.embed(x)
    return method, cfg, dm, emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]).float().contiguous()


def sync_if_cuda() -> None:
    """Wait for the GPU where CUDA has started (a no-op on a CPU-only run)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def part_timers(targets):
    """Wrap ``owner.attribute`` of each (label, owner, attribute) with a timer that synchronises
    the GPU before it starts and stops (GPU time is charged to the part that queued it); a part
    called inside another of the same context is counted in the outer one only. Yields
    {label: [seconds, calls, rows]} (rows: first dimension of the first tensor argument)."""
    spent: dict[str, list] = {}
    depth = {"n": 0}
    originals = []
    for label, owner, name in targets:
        fn = getattr(owner, name)
        originals.append((owner, name, fn))

        def wrapped(*args, __fn=fn, __label=label, **kwargs):
            if depth["n"]:  # nested inside another timed part: counted there
                return __fn(*args, **kwargs)
            depth["n"] += 1
            sync_if_cuda()
            t0 = time.perf_counter()
            try:
                return __fn(*args, **kwargs)
            finally:
                sync_if_cuda()
                rec = spent.setdefault(__label, [0.0, 0, 0])
                rec[0] += time.perf_counter() - t0
                rec[1] += 1
                first = next((a for a in args if isinstance(a, torch.Tensor)), None)  # (self,) queries, ...
                rec[2] += int(first.shape[0]) if first is not None else 0
                depth["n"] -= 1

        setattr(owner, name, wrapped)
    try:
        yield spent
    finally:
        for owner, name, fn in reversed(originals):
            setattr(owner, name, fn)
