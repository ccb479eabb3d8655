"""DFM (its defaults) against its untrained host at equal memory, on the same data, over seeds.

Each run is one real `python -m adtrain method=dfm ... test_start=true`: the untrained start (the
host's matching with the same memory: round 0) is validated, trained, selected on the validation
set, and both the kept state and the start are tested on the same test images. The table prints
test image AUROC mean ± std over seeds of both, the mean gain and the worst per-seed gain, plus
how often training was kept (the selection chose a trained round rather than the start).

    .venv/bin/python benchmarks/dfm_vs_host.py --seeds 0 1 2 --sets elpv_mono elpv_poly synthetic
    .venv/bin/python benchmarks/dfm_vs_host.py --seeds 0 1 2 --sets elpv_mono --extra method.host=cfa
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

SETS = {
    "elpv_mono": ["data=elpv", "data.category=mono"],
    "elpv_poly": ["data=elpv", "data.category=poly"],
    "synthetic": ["data=synthetic", "data.category=[texture,grid,stripes]"],
}


def run_one(name: str, seed: int, extra: list[str], out: Path) -> dict:
    run_dir = out / name / f"seed{seed}"
    res = run_dir / "results.json"
    if not res.exists():
        cmd = [sys.executable, "-m", "adtrain", "method=dfm", *SETS[name], f"seed={seed}", "test_start=true",
               "logger=none", "output.heatmaps=0", "trainer.enable_progress_bar=false", *extra,
               f"hydra.run.dir={run_dir}"]
        print(" ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(res.read_text())


def figures(r: dict) -> tuple[float, float, str]:
    """(kept state's test image AUROC, the untrained start's, what was kept)."""
    return r["image_auroc"], r["start_test"]["image_auroc"], r["selection"]["selected"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sets", nargs="+", default=["elpv_mono", "elpv_poly", "synthetic"])
    ap.add_argument("--extra", nargs="*", default=[])
    ap.add_argument("--out", default="outputs/dfm_vs_host")
    args = ap.parse_args()
    tag = "_".join(a.replace("=", "-").replace("/", "-") for a in args.extra) or "defaults"
    out = Path(args.out) / tag
    rows = []
    for name in args.sets:
        runs = [figures(run_one(name, s, args.extra, out)) for s in args.seeds]
        dfm = np.array([r[0] for r in runs])
        host = np.array([r[1] for r in runs])
        kept = sum(r[2] in ("epoch", "last") for r in runs)
        rows.append((name, dfm, host, kept))
        print(f"{name}: dfm {dfm.round(4).tolist()} host {host.round(4).tolist()}", flush=True)
    print(f"\n{' '.join(args.extra) or 'DFM defaults'}, seeds {args.seeds}\n")
    print("| data | DFM image AUROC | untrained host | mean gain | worst seed | trained state kept |")
    print("|---|---|---|---|---|---|")
    for name, dfm, host, kept in rows:
        d = dfm - host
        print(f"| {name} | {dfm.mean():.4f} ± {dfm.std():.4f} | {host.mean():.4f} ± {host.std():.4f} | "
              f"{d.mean():+.4f} | {d.min():+.4f} | {kept} of {len(dfm)} |")


if __name__ == "__main__":
    main()
