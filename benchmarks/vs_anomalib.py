"""adtrain versus anomalib 2.7, side by side on the same images (issue 14): one table.

    nice -n 10 .venv/bin/python benchmarks/vs_anomalib.py [--methods stfpm patchcore cfa]
        [--epochs 2] [--workdir /tmp/vs_anomalib] [--anomalib-python ../anovenv/bin/python]
        [--dry-run]

For each method it runs, back to back, adtrain's `python -m adtrain.bench` and anomalib's
`benchmarks/anomalib_baseline.py` (its own virtualenv, benchmarks/README.md) on the same images,
reads both JSON results and prints a markdown table: test images/s of each side and their
ratio, both image AUROCs, both fit seconds. It only calls those existing commands (every one is
printed before it runs; its output goes to WORKDIR/<side>_<method>.log) and re-implements none.

- Split: adtrain's own (`benchmarks/export_split.py`, ELPV mono, seed 0): 282 training cells,
  548 test cells.
- stfpm: EfficientNet-Lite0, 256x256, batch 32, --epochs epochs; adtrain with anomalib's loss
  reduction (`method.loss_reduction=anomalib`, the equal-recipe setting of docs/BENCHMARKS.md).
- patchcore: anomalib's setting, 32 training images (`--max-train 32` of the split without a
  held-out part, coreset 10 %): anomalib runs first and links its 32 training files and the
  test files into WORKDIR/anomalib_patchcore/data; adtrain then reads exactly those folders
  (`data=folder`, no held-out split).
- cfa: random-init ResNet-18 on both sides (anomalib's CFA only takes torchvision weights, which
  cannot be downloaded here: the AUROCs are a sanity check, the speed is the comparison),
  resize 256 + centre crop 224, batch 4, --epochs epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ELPV = ["data=elpv", "data.category=mono"]


def run(cmd: list[str], log: Path, env: dict | None = None, dry: bool = False) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    if dry:
        return
    t0 = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    print(f"  -> exit {rc} after {time.perf_counter() - t0:.0f} s, log {log}", flush=True)
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"command failed (exit {rc}); end of {log}:\n{tail}")


def jobs(method: str, args, work: Path, split: Path, split_all: Path) -> list[tuple[str, list[str], Path]]:
    """[(side, command, result JSON)] in the order they run."""
    py, ano = args.python, args.anomalib_python
    base = HERE / "anomalib_baseline.py"
    ep = str(args.epochs)

    def adtrain(*overrides: str) -> tuple[str, list[str], Path]:
        out = work / f"adtrain_{method}.json"
        return ("adtrain", [py, "-m", "adtrain.bench", f"method={method}", *overrides,
                            f"bench.out={out}", f"bench.run_dir={work / f'adtrain_{method}_run'}"], out)

    def anomalib(*opts: str, split_file: Path = split) -> tuple[str, list[str], Path]:
        wd = work / f"anomalib_{method}"
        return ("anomalib", [ano, str(base), "--split", str(split_file), "--model", method, *opts,
                             "--workdir", str(wd)], wd / "result.json")

    if method == "stfpm":
        return [adtrain(*ELPV, "backbone=efficientnet_lite0", f"trainer.max_epochs={ep}",
                        "method.loss_reduction=anomalib"),
                anomalib("--backbone", "efficientnet_lite0", "--epochs", ep, "--image-size", "256",
                         "--batch-size", "32")]
    if method == "patchcore":
        data = work / "anomalib_patchcore" / "data"
        return [anomalib("--backbone", "efficientnet_lite0", "--coreset-ratio", "0.1", "--image-size", "256",
                         "--batch-size", "32", "--max-train", "32", split_file=split_all),
                adtrain("data=folder", f"data.normal_dir={data / 'train_good'}",
                        f"data.abnormal_dir={data / 'test_bad'}", f"data.normal_test_dir={data / 'test_good'}",
                        "data.val_split=0", "backbone=efficientnet_lite0", "method.center_crop=null")]
    if method == "cfa":
        return [adtrain(*ELPV, "backbone=resnet18", "backbone.pretrained=false", f"trainer.max_epochs={ep}"),
                anomalib("--backbone", "resnet18", "--random-init", "--epochs", ep, "--image-size", "256",
                         "--center-crop", "224", "--batch-size", "4")]
    raise SystemExit(f"unknown method {method}")


def row(method: str, a: dict, b: dict) -> dict:
    ra, rb = a["test_images_per_second"], b["test_images_per_second"]
    return {"method": method, "adtrain_test_img_s": ra, "anomalib_test_img_s": rb,
            "ratio": round(ra / rb, 2) if rb else None,
            "adtrain_image_auroc": a["image_auroc"], "anomalib_image_auroc": b["image_AUROC"],
            "adtrain_fit_s": a["fit_seconds"], "anomalib_fit_s": b["fit_seconds"],
            "adtrain_num_train": a.get("num_train"), "anomalib_num_train": b.get("n_train"),
            "num_test": (a.get("num_test"), b.get("n_test"))}


def table(rows: list[dict]) -> str:
    head = ("| method | adtrain test img/s | anomalib test img/s | ratio | adtrain image AUROC "
            "| anomalib image AUROC | adtrain fit s | anomalib fit s | train images (adtrain/anomalib) |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['method']} | {r['adtrain_test_img_s']} | {r['anomalib_test_img_s']} | {r['ratio']} "
                     f"| {r['adtrain_image_auroc']:.4f} | {r['anomalib_image_auroc']:.4f} | {r['adtrain_fit_s']} "
                     f"| {r['anomalib_fit_s']} | {r['adtrain_num_train']}/{r['anomalib_num_train']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["stfpm", "patchcore", "cfa"],
                    choices=["stfpm", "patchcore", "cfa"])
    ap.add_argument("--epochs", type=int, default=2, help="STFPM and CFA epochs, both sides (PatchCore: 1)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/vs_anomalib"))
    ap.add_argument("--python", default=sys.executable, help="adtrain's interpreter")
    ap.add_argument("--anomalib-python", default=os.environ.get("ANOMALIB_PYTHON", "../anovenv/bin/python"))
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = ap.parse_args(argv)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    ano_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # anomalib never sees adtrain
    print(f"# vs_anomalib: {shlex.join([sys.executable, *sys.argv])}", flush=True)

    split, split_all = work / "split.json", work / "split_all.json"
    export = [args.python, str(HERE / "export_split.py"), *ELPV]
    if {"stfpm", "cfa"} & set(args.methods):
        run([*export, "--out", str(split)], work / "export_split.log", dry=args.dry_run)
    if "patchcore" in args.methods:
        run([*export, "data.val_split=0", "--out", str(split_all)], work / "export_split_all.log", dry=args.dry_run)

    rows = []
    for method in args.methods:
        results = {}
        for side, cmd, out in jobs(method, args, work, split, split_all):
            run(cmd, work / f"{side}_{method}.log", env=ano_env if side == "anomalib" else None, dry=args.dry_run)
            if not args.dry_run:
                results[side] = json.loads(out.read_text())
        if not args.dry_run:
            rows.append(row(method, results["adtrain"], results["anomalib"]))
            print(table(rows[-1:]), flush=True)
    if rows:
        (work / "vs_anomalib.json").write_text(json.dumps(rows, indent=1))
        print("\n" + table(rows))
    return rows


if __name__ == "__main__":
    main()
