"""One test batch of a finished run: milliseconds per image, kernel (sys) time and page faults.

    PYTHONPATH=src python benchmarks/batch_faults.py RUN_DIR [--batch 8] [--rounds 2]
        [--gather-floats 8388608 2097152]

Loads the run's model and its first --batch test images, calls ``method.anomaly_output`` once to
warm up, then --rounds times, each with its wall time, the process's user and sys CPU seconds and
minor page faults (``getrusage``). Run it with two checkouts' ``src`` on PYTHONPATH to compare
them (docs/BENCHMARKS.md, "HETMM's matching without page faults").
With --gather-floats A B the rounds alternate ``adtrain.memory.index.GATHER_FLOATS_CPU`` (the
exact re-ranking's chunk) between A and B in one process, print the median per value, and check
that both give the same scores and maps.
"""

from __future__ import annotations

import resource
import statistics
import time

import torch
from _timing import run_batch_cli


def main() -> None:
    args, method, _, dm, batch = run_batch_cli(
        __doc__, batch=8, repeat=2,
        extra=lambda ap: ap.add_argument("--gather-floats", type=int, nargs=2, default=None))
    import adtrain.memory.index as index

    torch.set_num_threads(2)
    x = batch["image"]
    x = dm.input_normalizer(x) if x.dtype == torch.uint8 else x
    n = x.shape[0]
    # a checkout before GATHER_FLOATS_CPU existed has its chunk built in: label it "built-in"
    settings = args.gather_floats or [getattr(index, "GATHER_FLOATS_CPU", "built-in")]
    times: dict = {s: [] for s in settings}
    outs = {}
    with torch.no_grad():
        method.anomaly_output(x)
        for _ in range(args.rounds):
            for s in settings:
                if args.gather_floats:
                    index.GATHER_FLOATS_CPU = s
                r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                outs[s] = method.anomaly_output(x)
                ms = (time.perf_counter() - t0) * 1000 / n
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                times[s].append(ms)
                print(f"gather_floats {s}: {ms:.1f} ms per image, user {r1.ru_utime - r0.ru_utime:.2f} s, "
                      f"sys {r1.ru_stime - r0.ru_stime:.2f} s, minor faults {r1.ru_minflt - r0.ru_minflt}")
    for s, v in times.items():
        print(f"gather_floats {s}: median {statistics.median(v):.1f} ms per image, min {min(v):.1f}")
    if len(settings) == 2:
        a, b = (outs[s] for s in settings)
        print("identical:", torch.equal(a.pred_score, b.pred_score) and torch.equal(a.anomaly_map, b.anomaly_map))


if __name__ == "__main__":
    main()
