"""The tables a person reads at the end of a run and of a sweep (rich if installed, else plain text).

`run_table` / `sweep_table` return (title, header, rows, footer); `render` draws one with rich when
it is importable and as plain aligned columns otherwise; `show_run` / `show_sweep` print it.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

#: (results.json key, label, which data it was measured on) in the order shown
RUN_ROWS = (
    ("image_auroc", "image AUROC", "test"),
    ("image_ap", "image AP", "test"),
    ("image_f1max", "image F1-max", "test"),
    ("sample_auroc", "sample AUROC (views)", "test"),
    ("pixel_auroc", "pixel AUROC", "test"),
    ("pixel_ap", "pixel AP", "test"),
    ("pixel_f1max", "pixel F1-max", "test"),
    ("pixel_aupro", "pixel AUPRO", "test"),
    ("val_image_auroc", "image AUROC", "validation"),
    ("val_normal_score", "mean normal score", "validation"),
    ("threshold", "image threshold", "validation"),
    ("selected_checkpoint", "state kept", "validation"),
    ("fit_seconds", "fit seconds", ""),
    ("test_images_per_second", "test images/s", "test"),
    ("peak_memory_mb", "peak memory MB", ""),
)
#: the test figures a several-category run computes over all its categories' images together
POOLED = ("image AUROC", "image AP", "image F1-max", "pixel AUROC", "pixel AP", "pixel F1-max", "pixel AUPRO")
SWEEP_VALUES = ("val_image_auroc", "image_auroc", "pixel_auroc", "fit_seconds")


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.1f}" if abs(value) >= 10 else f"{value:.4f}"
    return str(value)


def run_table(results: dict, run_dir: Path | str) -> tuple[str, list[str], list[list[str]], str]:
    """A single run: each figure with the data it was measured on; a continual run: final and
    forgetting of each matrix metric."""
    what = (f"{results.get('method')} on {results.get('data')}/{results.get('category')} "
            f"({results.get('backbone')}, seed {results.get('seed')})")
    footer = f"run directory: {run_dir}  (results.json, heatmaps/, checkpoints/model.ckpt)"
    if isinstance(results.get("summary"), dict) and "matrices" in results:
        final = results.get("final_checkpoint") or "tasks/<last task>/model.ckpt"  # each task's under tasks/
        footer = f"run directory: {run_dir}  (results.json, tasks/<t>/, the final model {final})"
        summary = results["summary"]
        metrics = list(results["matrices"])
        rows = [[m, fmt(summary.get(f"final_{m}")), fmt(summary.get(f"forgetting_{m}"))] for m in metrics]
        return (f"{what}: continual, {results['summary'].get('num_tasks')} tasks", ["metric", "final (mean over tasks)",
                "forgetting"], rows, footer)
    rows = [[label, fmt(results.get(key)), where] for key, label, where in RUN_ROWS
            if key in results and not (where == "test" and results.get(key) is None)]
    decided = results.get("test_at_threshold") or {}
    if decided:  # the test images' decisions at the validation threshold, before the validation figures
        at = next((i for i, r in enumerate(rows) if r[2] != "test"), len(rows))
        rows[at:at] = [[f"{label} at threshold", fmt(decided.get(key)), "test"]
                       for key, label in (("recall", "defects caught"), ("false_alarm_rate", "false alarms"))]
        pixels = results.get("pixel_test_at_threshold") or {}
        if pixels:  # the decision masks' quality at the pixel threshold
            rows[at + 2:at + 2] = [["pixel F1 at threshold", fmt(pixels.get("f1")), "test"]]
    # after the overall image AUROC: each category of a several-category task, else each defect type
    by_defect = results.get("image_auroc_by_defect") or {}
    cats = {k: v.get("image_auroc") for k, v in (results.get("by_category") or {}).items()}
    parts = cats or (by_defect if len(by_defect) > 1 else {})
    at = next((i + 1 for i, r in enumerate(rows) if r[0] == "image AUROC" and r[2] == "test"), 0)
    if cats and at:  # several categories: the top-level figures rank all their images (pixels) together
        for row in rows:
            if row[2] == "test" and row[0] in POOLED:
                row[0] = f"{row[0]}, categories pooled"
        parts = {"mean of categories": cats.pop("mean", None), **cats}  # the multi-class protocol's figure first
    rows[at:at] = [[f"  image AUROC, {k}", fmt(v), "test"] for k, v in parts.items()]
    auspro = results.get("auspro") or {}
    if auspro:  # MVTec LOCO AD's metric, after pixel AUPRO: the mean over defect types, then each type
        at = next((i + 1 for i, r in enumerate(rows) if r[0] == "pixel AUPRO"), len(rows))
        one = next(iter(auspro["by_category"].values())) if len(auspro["by_category"]) == 1 else {}
        rows[at:at] = [["AU-sPRO (FPR 0.05)", fmt(auspro["mean"].get("0.05")), "test"]] + \
            [[f"  AU-sPRO, {k}", fmt(v.get("0.05")), "test"] for k, v in one.items() if k != "mean"]
    if results.get("pixel_resolution") == "source":  # metrics.resolution=source
        rows = [[r[0], r[1], "test, source size"] if r[2] == "test" and ("pixel" in r[0] or "AU-sPRO" in r[0])
                else r for r in rows]
    if results.get("tested") is False:  # no heatmaps/ nor scores.csv were written
        footer = f"test=false: the test set was not opened; run directory: {run_dir}  (results.json, checkpoints/model.ckpt)"
    return what, ["figure", "value", "measured on"], rows, footer


def sweep_table(rows: list[dict], swept: list[str], sweep_dir: Path | str,
                files: tuple = ()) -> tuple[str, list[str], list[list[str]], str]:
    # the key columns beside method and category where the jobs differ (seed=0,1, backbone=a,b: never
    # swept columns), else two jobs of one setting and other figures stood side by side unexplained
    varying = [k for k in ("data", "backbone", "seed") if len({str(r.get(k)) for r in rows}) > 1]
    head = ["job", "method", "category", *varying, *swept, *SWEEP_VALUES]
    body = [[str(r.get("job")), str(r.get("method", "-")), str(r.get("category", "-")), *(fmt(r.get(k)) for k in varying),
             *(fmt(r.get(k)) for k in swept),
             *(fmt(r.get(k)) if "error" not in r else ("failed" if i == 0 else "") for i, k in enumerate(SWEEP_VALUES))]
            for r in rows]
    footer = f"sweep directory: {sweep_dir}" + (f"  (summary: {', '.join(Path(f).name for f in files)})" if files else "")
    return f"sweep: {len(rows)} jobs", head, body, footer


def plain(title: str, head: list[str], rows: list[list[str]], footer: str = "") -> str:
    """Aligned columns: text left-aligned, numbers right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]

    def line(cells) -> str:
        return "  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([title, line(head), rule, *(line(r) for r in rows), *([footer] if footer else [])])


def _numeric(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return cell == "-"


def render(title: str, head: list[str], rows: list[list[str]], footer: str = "", file=None) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(plain(title, head, rows, footer), file=file or sys.stdout, flush=True)
        return
    from rich.text import Text

    table = Table()
    for i, h in enumerate(head):
        right = i > 0 and 2 * sum(_numeric(r[i]) for r in rows) > len(rows)
        table.add_column(Text(h), justify="right" if right else "left", overflow="fold")
    for r in rows:  # as text: rich's markup took a cell's [layer2,layer3] for a tag and dropped it
        table.add_row(*(Text(str(c)) for c in r))
    console = Console(file=file, soft_wrap=True, highlight=False)
    if not console.is_terminal and not os.environ.get("COLUMNS"):  # a log file (SLURM, `> log`): rich drew at
        from rich.measure import Measurement  # 80 columns, a wide sweep's table one character per column

        console.width = max(console.width, Measurement.get(console, console.options.update_width(10_000), table).maximum)
    console.print(Text(title, style="bold"))
    console.print(table)
    if footer:
        console.print(Text(footer))


def show_run(results: dict, run_dir: Path | str, file=None) -> None:
    render(*run_table(results, run_dir), file=file)


def show_sweep(rows: list[dict], swept: list[str], sweep_dir: Path | str, files: tuple = (), file=None) -> None:
    render(*sweep_table(rows, swept, sweep_dir, files), file=file)
