"""Hydra callback: after a multirun, one summary table of every job (CSV and markdown)."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from adtrain.io import write_text

log = logging.getLogger("adtrain")

KEY_COLUMNS = ("method", "data", "category", "backbone", "seed")
VALUE_COLUMNS = (
    "image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro",
    "fit_seconds", "test_images_per_second", "peak_memory_mb",
)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def collect(sweep_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(sweep_dir.glob("*/results.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        res = json.loads(path.read_text())
        if "summary" in res and "method" not in res:  # continual run: its summary row
            res = {**res.get("summary", {}), **{k: res.get(k) for k in KEY_COLUMNS}}
        rows.append({"job": path.parent.name, **res})
    for path in sorted(sweep_dir.glob("*/error.txt")):
        rows.append({"job": path.parent.name, "error": path.read_text().strip()})
    return rows


def summarize(sweep_dir: Path) -> tuple[Path, Path] | None:
    rows = collect(sweep_dir)
    if not rows:
        return None
    cols = ["job", *KEY_COLUMNS, *VALUE_COLUMNS] + (["error"] if any("error" in r for r in rows) else [])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: (json.dumps(r[c]) if isinstance(r.get(c), list) else r.get(c)) for c in cols})
    csv_path = write_text(sweep_dir / "summary.csv", buf.getvalue())

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    # mean and std over seeds of the same (method, data, category, backbone)
    groups = defaultdict(list)
    for r in rows:
        if "error" not in r:
            groups[tuple(str(r.get(k)) for k in KEY_COLUMNS[:-1])].append(r)
    if any(len(g) > 1 for g in groups.values()):
        lines += ["", "Mean ± std over seeds:", ""]
        head = [*KEY_COLUMNS[:-1], "n", *VALUE_COLUMNS[:7]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key, g in groups.items():
            cells = list(key) + [str(len(g))]
            for c in VALUE_COLUMNS[:7]:
                vals = [r[c] for r in g if isinstance(r.get(c), (int, float))]
                cells.append(f"{np.mean(vals):.4f} ± {np.std(vals):.4f}" if vals else "-")
            lines.append("| " + " | ".join(cells) + " |")
    md_path = write_text(sweep_dir / "summary.md", "\n".join(lines) + "\n")
    return csv_path, md_path


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        out = summarize(Path(config.hydra.sweep.dir))
        if out:
            log.info("Sweep summary: %s and %s", *out)
