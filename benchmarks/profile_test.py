"""What bounds a run's end-to-end test: its test repeated, timed, then once with timers on its parts.

    python benchmarks/profile_test.py RUN_DIR [--repeat 2] [--out FILE] [-- overrides]

RUN_DIR is a finished run (e.g. the one `python -m adtrain.bench ... bench.run_dir=DIR` leaves).
The test (`adtrain.test`: decode or cache read, transforms, copy to the device, scoring, metrics)
runs `--repeat` times (the test images/s of each), then once with timers: the main process's
parts are wrapped (DataLoader `__next__` = waiting for the workers, the batch's transfer and
normalisation, the model's `anomaly_output`, the pixel metrics' update, the epoch end, and the
metrics' `compute` after it: the held pixel scores' exact count),
each wrapper synchronising the GPU before it stops its clock, so GPU time is charged to the part
that queued it. The synchronisation removes the overlap of host and GPU work, so the timed run is
slower than the plain ones; the split says where the time goes, the plain runs how fast it is.
Then once more under cProfile, for the functions' own time (on Python 3.12+ cProfile sees every
thread, so only its own-time list is shown, not cumulative times). Prints one JSON object at the end.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from contextlib import contextmanager

from _timing import part_timers


@contextmanager
def timers():
    """Wrap the test path's parts with synchronising timers; yields {part: [seconds, calls, rows]}."""
    from torch.utils.data import dataloader

    from adtrain.methods.base import AnomalyModule
    from adtrain.metrics.evaluator import AnomalyEvaluator

    import adtrain.methods.cfa, adtrain.methods.dfm, adtrain.methods.hetmm  # noqa: E401,F401  (their classes)
    import adtrain.methods.patchcore, adtrain.methods.stfpm  # noqa: E401,F401

    def family(cls):
        yield cls
        for sub in cls.__subclasses__():
            yield from family(sub)

    hooks = ("on_after_batch_transfer", "anomaly_output", "on_test_epoch_end")
    labels = {"on_after_batch_transfer": "transfer + normalisation (on_after_batch_transfer)",
              "anomaly_output": "model (anomaly_output)", "on_test_epoch_end": "epoch end (on_test_epoch_end)"}
    targets = [("data wait (DataLoader __next__)", dataloader._BaseDataLoaderIter, "__next__"),
               ("pixel metrics (update_pixels)", AnomalyEvaluator, "update_pixels"),
               ("metrics at the end (AnomalyEvaluator.compute)", AnomalyEvaluator, "compute")]
    targets += [(labels[name], cls, name) for cls in set(family(AnomalyModule)) for name in hooks
                if name in vars(cls)]  # every class that defines the hook (overrides nest: counted once)
    with part_timers(targets) as spent:
        yield spent


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import adtrain

    rates = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        res = adtrain.test(args.run_dir, overrides)
        rates.append({"test_images_per_second": res["test_images_per_second"], "num_test": res["num_test"],
                      "wall_seconds": round(time.perf_counter() - t0, 3)})
        print("test:", rates[-1], flush=True)
    with timers() as spent:
        t0 = time.perf_counter()
        timed = adtrain.test(args.run_dir, overrides)
        timed_wall = time.perf_counter() - t0
    split = {k: round(v[0], 3) for k, v in spent.items()}
    test_seconds = float(timed["test_seconds"])
    print(f"timed test: {timed['test_images_per_second']} images/s, test {test_seconds:.2f} s")
    for label, sec in split.items():
        print(f"  {label:<52} {sec:8.3f} s  {100 * sec / test_seconds:5.1f} %")
    prof = cProfile.Profile()
    prof.enable()
    res = adtrain.test(args.run_dir, overrides)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.top)
    top = "\n".join(line for line in text.getvalue().splitlines() if line.strip())
    top = top[top.find("ncalls"):] if "ncalls" in top else top
    print(f"profiled test: {res['test_images_per_second']} images/s; own time, all threads:")
    print(top)
    out = {"command": "python benchmarks/profile_test.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "runs": rates,
           "timed": {"test_images_per_second": timed["test_images_per_second"], "test_seconds": test_seconds,
                     "wall_seconds": round(timed_wall, 3), "parts_seconds": split},
           "profiled_test_images_per_second": res["test_images_per_second"]}
    print(json.dumps(out, indent=2))
    if args.out:
        from adtrain.io import write_json

        write_json(args.out, {**out, "top_by_own_time": top})
    return out


if __name__ == "__main__":
    main()
