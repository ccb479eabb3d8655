"""A PatchCore sweep over method.coreset_ratio with every cache off, then with the caches on (issue 14).

    nice -n 10 .venv/bin/python benchmarks/sweep_coreset.py --ratios 0.01,0.02,0.03,0.04,0.05,0.06,0.07,0.08,0.09,0.1 \\
        -- data=elpv backbone=efficientnet_lite0

1. ``off``: every job with data.cache=off feature_cache=off method.nested_cache=off (today's path
   without caches).
2. ``warm-up``: one job at the first ratio with the image and feature caches on and
   method.nested_cache=off, into an empty cache folder: it fills the decoded-image and feature
   caches (the "warm feature cache" of the target). Timed and printed, not counted in the sweep.
3. ``on``: every job with data.cache=auto feature_cache=on (method.nested_cache=auto follows it):
   its first job starts with empty coreset / neighbour-record caches (cold for those), the later
   ones resume the greedy order and extend the records.

Printed per job: wall, fit, validation and test seconds, the caches' states and the image AUROC;
then the totals, on / off, and whether the results (image AUROC / AP / F1-max, validation AUROC,
threshold) and every image's score (scores.csv) are identical. Runs in this process
(adtrain.run.run); extra arguments after ``--`` are overrides for every job; each job's figures are
also written to <run dir>/sweep_job.json (``--reuse-off`` takes finished off jobs from there). One
JSON object at the end (the load average is the 1-minute one at each job's end).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

KEYS = ("image_auroc", "image_ap", "image_f1max", "val_image_auroc", "threshold")
COLS = ("wall_seconds", "fit_seconds", "val_seconds", "test_seconds", "image_auroc", "feature_cache", "nested_cache")


def one_run(overrides: list[str], run_dir: Path, reuse: bool = False) -> dict:
    from adtrain.api import compose
    from adtrain.run import run

    saved = run_dir / "sweep_job.json"
    if reuse and saved.is_file():  # --reuse-off: a finished job of an earlier invocation
        return {**json.loads(saved.read_text()), "scores_csv": (run_dir / "scores.csv").read_text(), "reused": True}

    t0 = time.perf_counter()
    res = run(compose(["logger=none", "output.heatmaps=0", "trainer.enable_progress_bar=false", *overrides]), run_dir)
    wall = time.perf_counter() - t0
    out = {"wall_seconds": round(wall, 2), **{k: res[k] for k in ("fit_seconds", "val_seconds", "test_seconds")},
            "image_cache": res["image_cache"], "feature_cache": res["feature_cache"],
            "nested_cache": res.get("nested_cache", "off"), "nested_cache_lookups": res.get("nested_cache_lookups"),
            **{k: res[k] for k in KEYS}, "load": round(os.getloadavg()[0], 2)}
    saved.write_text(json.dumps(out, indent=1))
    return {**out, "scores_csv": (run_dir / "scores.csv").read_text()}


def row(name: str, r: dict) -> str:
    return f"{name:<18}" + "".join(f"{str(r[c]):>16} " for c in COLS)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/sweep_coreset.py " + " ".join(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratios", default="0.01,0.02,0.03,0.04,0.05,0.06,0.07,0.08,0.09,0.1")
    p.add_argument("--work", default=None, help="folder for run directories and caches (default: a temp dir)")
    p.add_argument("--skip-off", action="store_true", help="only the cached sweep (no comparison)")
    p.add_argument("--reuse-off", action="store_true",
                   help="take the off jobs already finished in --work (their sweep_job.json) instead of rerunning them")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from adtrain.logs import quiet

    quiet()
    import albumentations  # noqa: F401  (imports paid before any timing)
    import faiss  # noqa: F401
    import timm  # noqa: F401

    from adtrain.bench import machine

    ratios = [float(r) for r in args.ratios.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="adtrain-sweep-"))
    common = ["method=patchcore", *extra, f"paths.cache_dir={work / 'cache'}"]
    off_args = [*common, "data.cache=off", "feature_cache=off", "method.nested_cache=off"]
    on_args = [*common, "data.cache=auto", "feature_cache=on"]
    print(f"{'job':<18}" + "".join(f"{c:>16} " for c in COLS), flush=True)
    off, on = {}, {}
    if not args.skip_off:
        for r in ratios:
            off[r] = one_run([*off_args, f"method.coreset_ratio={r}"], work / f"off_{r}", args.reuse_off)
            print(row(f"off {r}", off[r]), f"load {off[r]['load']}" + (" (reused)" if off[r].get("reused") else ""),
                  flush=True)
    warm_up = one_run([*on_args, "method.nested_cache=off", f"method.coreset_ratio={ratios[0]}"], work / "warm_up")
    print(row(f"warm-up {ratios[0]}", warm_up), f"load {warm_up['load']}", flush=True)
    for r in ratios:
        on[r] = one_run([*on_args, f"method.coreset_ratio={r}"], work / f"on_{r}")
        print(row(f"on {r}", on[r]), f"load {on[r]['load']}", flush=True)
    on_total = sum(v["wall_seconds"] for v in on.values())
    out = {"command": command, "machine": machine(), "ratios": ratios, "overrides": extra,
           "on_wall_seconds": round(on_total, 2), "warm_up_wall_seconds": warm_up["wall_seconds"]}
    if off:
        off_total = sum(v["wall_seconds"] for v in off.values())
        same = all(off[r][k] == on[r][k] for r in ratios for k in KEYS)
        same_scores = all(off[r]["scores_csv"] == on[r]["scores_csv"] for r in ratios)
        out.update(off_wall_seconds=round(off_total, 2), on_over_off=round(on_total / off_total, 3),
                   identical=same, identical_scores=same_scores)
        print(f"\n{len(ratios)} jobs: wall seconds off {off_total:.1f}, on {on_total:.1f} "
              f"({on_total / off_total:.3f} of off; the warm-up job's {warm_up['wall_seconds']:.1f} s not counted, "
              f"{(on_total + warm_up['wall_seconds']) / off_total:.3f} with it); results identical: {same}; "
              f"scores.csv identical: {same_scores}", flush=True)
    for part, runs in (("off", off), ("on", on)):
        out[part] = {str(r): {k: v for k, v in runs[r].items() if k != "scores_csv"} for r in runs}
    out["warm_up"] = {k: v for k, v in warm_up.items() if k != "scores_csv"}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
