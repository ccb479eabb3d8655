"""End-to-end throughput with the caches off, cold and warm, side by side in one run (issue 14).

    nice -n 10 .venv/bin/python benchmarks/throughput.py --methods patchcore --sweep 0.1,0.05 \\
        -- data=elpv backbone=efficientnet_lite0

For each method: three ordinary runs (fit, select, threshold, test; adtrain.run.run in this
process) into a fresh cache folder: ``off`` (data.cache=off feature_cache=off: today's path),
``cold`` (data.cache=auto feature_cache=on, empty caches: they are filled) and ``warm`` (the same
again: everything served from the caches). Printed per run: fit seconds, validation seconds,
end-to-end test images/s (decode, transforms, scoring, metrics), the whole run's wall seconds, the
image AUROC and what each cache did. ``--sweep R1,R2,..`` (PatchCore) then runs the jobs of a sweep
over method.coreset_ratio with the caches off and with warm caches (the cold run above filled them:
that is the first job of a sweep starting from empty caches) and checks the results are identical.
Extra arguments after ``--`` are run overrides for every run. Prints one JSON object at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

KEYS = ("image_auroc", "image_ap", "image_f1max", "val_image_auroc", "threshold")


def one_run(overrides: list[str], run_dir: Path) -> dict:
    from adtrain.api import compose
    from adtrain.run import run

    t0 = time.perf_counter()
    res = run(compose(["logger=none", "output.heatmaps=0", *overrides]), run_dir)
    wall = time.perf_counter() - t0
    return {"wall_seconds": round(wall, 2), "fit_seconds": res["fit_seconds"], "val_seconds": res["val_seconds"],
            "test_images_per_second": res["test_images_per_second"], "image_cache": res["image_cache"],
            "feature_cache": res["feature_cache"], "lookups": res["feature_cache_lookups"],
            **{k: res[k] for k in KEYS}}


def table(rows: dict[str, dict]) -> str:
    cols = ("wall_seconds", "fit_seconds", "val_seconds", "test_images_per_second", "image_auroc",
            "image_cache", "feature_cache")
    lines = [f"{'run':<22}" + "".join(f"{c:>24}" for c in cols)]
    for name, r in rows.items():
        lines.append(f"{name:<22}" + "".join(f"{str(r[c]):>24}" for c in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/throughput.py " + " ".join(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="patchcore", help="comma-separated method names")
    p.add_argument("--sweep", default="", help="PatchCore coreset ratios of a sweep, e.g. 0.1,0.05")
    p.add_argument("--work", default=None, help="folder for run directories and caches (default: a temp dir)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from adtrain.logs import quiet

    quiet()
    import albumentations  # noqa: F401  (imports paid before any timing)
    import faiss  # noqa: F401
    import timm  # noqa: F401

    from adtrain.bench import machine

    work = Path(args.work or tempfile.mkdtemp(prefix="adtrain-throughput-"))
    out = {"command": command,
           "machine": machine(), "overrides": extra, "methods": {}}
    for method in args.methods.split(","):
        cache = work / method / "cache"
        common = [f"method={method}", *extra, f"paths.cache_dir={cache}"]
        off_args = [*common, "data.cache=off", "feature_cache=off"]
        on_args = [*common, "data.cache=auto", "feature_cache=on"]
        rows = {"off": one_run(off_args, work / method / "off"),
                "cold": one_run(on_args, work / method / "cold"),
                "warm": one_run(on_args, work / method / "warm")}
        print(f"\n{method}\n{table(rows)}", flush=True)
        entry = {"runs": rows, "identical": all(rows["off"][k] == rows[m][k] for m in ("cold", "warm") for k in KEYS)}
        if args.sweep and method == "patchcore":
            ratios = [float(r) for r in args.sweep.split(",")]
            sweep = {}
            for r in ratios:
                sweep[f"off ratio={r}"] = (rows["off"] if r == 0.1 and "method.coreset_ratio" not in " ".join(extra)
                                           else one_run([*off_args, f"method.coreset_ratio={r}"], work / method / f"off_{r}"))
                sweep[f"warm ratio={r}"] = one_run([*on_args, f"method.coreset_ratio={r}"], work / method / f"warm_{r}")
            off_total = sum(v["wall_seconds"] for k, v in sweep.items() if k.startswith("off"))
            warm_total = sum(v["wall_seconds"] for k, v in sweep.items() if k.startswith("warm"))
            same = all(sweep[f"off ratio={r}"][k] == sweep[f"warm ratio={r}"][k] for r in ratios for k in KEYS)
            print(f"\nsweep over method.coreset_ratio={ratios}\n{table(sweep)}\n"
                  f"jobs: {len(ratios)}; wall seconds off {off_total:.1f}, warm {warm_total:.1f} "
                  f"({warm_total / off_total:.2f} of off); results identical: {same}", flush=True)
            entry["sweep"] = {"jobs": sweep, "off_wall_seconds": round(off_total, 2),
                              "warm_wall_seconds": round(warm_total, 2), "identical": same}
        out["methods"][method] = entry
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
