"""Multiruns: the value a job returns to its sweeper, and one summary table of every job.

`objective` is what `python -m adtrain -m ...` hands the sweeper (Optuna or the basic grid):
`results[optimized_metric]`, a validation figure, never a test one. `SweepSummary` (a Hydra
callback) checks that key before the first job and, after the last, writes summary.csv/.md with
the swept overrides as columns and the mean ± std over seeds of each swept setting.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from adtrain.api import read_results
from adtrain.errors import ConfigError, DataError
from adtrain.io import write_text
from adtrain.sweep_dir import drop_records, lock_sweep_dir, prepare_sweep_dir, unlock_sweep_dir

log = logging.getLogger("adtrain")

KEY_COLUMNS = ("method", "data", "category", "backbone", "seed")
# validation figures of the selected model state (held-out normals + synthetic anomalies)
VAL_COLUMNS = ("val_image_auroc", "val_pixel_auroc", "val_pixel_aupro", "val_normal_score", "val_normal_map_mean")
TEST_COLUMNS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
VALUE_COLUMNS = (*VAL_COLUMNS, *TEST_COLUMNS, "fit_seconds", "test_images_per_second", "peak_memory_mb")
MEAN_COLUMNS = (*VAL_COLUMNS, *TEST_COLUMNS)
# the keys a sweep may optimise, and which way (lower normal score = tighter on normals)
OBJECTIVES = {
    "val_image_auroc": "maximize",
    "val_pixel_auroc": "maximize",
    "val_pixel_aupro": "maximize",
    "val_normal_score": "minimize",
    "val_normal_map_mean": "minimize",
}
# a continual run's summary columns (final average over tasks, forgetting) per metric
CONTINUAL_PREFIXES = ("final_", "forgetting_")
# a several-category job's mean over its categories (results.json by_category.mean; the top-level
# figures pool the categories' images): the multi-class protocol's figures
CATEGORY_MEAN_PREFIX = "category_mean_"

# overrides that say how a job ran, not what it ran (never a swept column)
_RUN_FLAGS = {"overwrite", "resume"}
# override keys that repeat a key column (the summary already shows them)
_SHOWN_OVERRIDES = {"seed", "method", "data", "backbone", "data.category"}


# ---------------------------------------------------------------- the objective


def check_objective(metric) -> str | None:
    """The optimised key, refused unless it is a validation figure (null = no objective)."""
    if metric is None:
        return None
    if metric not in OBJECTIVES:
        hint = f" (val_{metric} is its validation counterpart)" if f"val_{metric}" in OBJECTIVES else ""
        raise ConfigError(
            "optimized_metric",
            f"'{metric}' is not a validation figure{hint}; a sweep may optimise only "
            f"{', '.join(OBJECTIVES)}: test data never drives a choice",
        )
    return str(metric)


def check_direction(metric, direction) -> None:
    """Refuse a sweeper direction that optimises the metric the wrong way."""
    metric = check_objective(metric)
    if metric is None or direction is None:
        return
    names = [str(getattr(d, "name", d)) for d in (direction if isinstance(direction, (list, tuple)) else [direction])]
    if names != [OBJECTIVES[metric]]:
        raise ConfigError(
            "hydra.sweeper.direction",
            f"{names if len(names) > 1 else names[0]} for optimized_metric={metric}; "
            f"it must be {OBJECTIVES[metric]}",
        )


def objective(results, metric, quiet: bool = False) -> float | None:
    """float(results[metric]), or None (a failed trial for Optuna) when missing, null or not finite
    (warned, unless ``quiet``: a single run, which no sweeper reads)."""
    metric = check_objective(metric)
    if metric is None or not isinstance(results, dict):
        return None
    value = results.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        (log.debug if quiet else log.warning)("optimized_metric %s is %r in this run's results: the sweeper "
                                              "sees a failed trial", metric, value)
        return None
    return float(value)


def dfm_schedule(cfg: DictConfig, trial) -> None:
    """Optuna custom_search_space for DFM: method.max_epochs = rounds * (stage1 + stage2 epochs).

    The searched (or fixed) schedule sets the trainer's epochs, so no trial cycles its stages past
    the schedule. Suggested as a one-value int, it becomes an override of the trial (and is in
    best_params). Left alone when method.max_epochs is a fixed override already."""
    key = "method.max_epochs"
    if key in trial.user_attrs or key in trial.params:
        return

    def value(name: str) -> int:
        return int(trial.params.get(f"method.{name}", trial.user_attrs.get(f"method.{name}", cfg.method[name])))

    total = value("rounds") * (value("stage1_epochs") + value("stage2_epochs"))
    trial.suggest_int(key, total, total)


# ---------------------------------------------------------------- the summary


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def read_overrides(job_dir: Path) -> dict[str, str]:
    """The job's command-line overrides (`.hydra/overrides.yaml`) as {key: value}, in order."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    out = {}
    for item in OmegaConf.load(path) or []:
        key, sep, value = str(item).partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def swept_keys(overrides: list[dict[str, str]]) -> list[str]:
    """Override keys whose value differs between jobs (or that only some jobs have), first-seen order."""
    keys: dict[str, None] = {}
    for o in overrides:
        keys.update(dict.fromkeys(o))
    return [k for k in keys if k not in _SHOWN_OVERRIDES and k not in _RUN_FLAGS
            and len({o.get(k) for o in overrides}) > 1]


def collect(sweep_dir: Path) -> list[dict]:
    """One row per job: its results (or its error) and its overrides under '_overrides'."""
    rows = []
    found = [p for p in sweep_dir.glob("**/results.json") if (p.parent / ".hydra").is_dir()]
    for path in sorted(found, key=lambda p: (len(str(p.parent.relative_to(sweep_dir))), str(p.parent))):
        try:
            res = read_results(path)
        except DataError as err:  # cut short or damaged: this job's row fails, not the whole summary
            rows.append(_failed_row(sweep_dir, path.parent, f"DataError: {err}"))
            continue
        if isinstance(res.get("summary"), dict):  # a continual run: its final averages and forgetting too
            res = {**res, **{k: v for k, v in res["summary"].items() if k.startswith(CONTINUAL_PREFIXES)}}
        if isinstance((res.get("by_category") or {}).get("mean"), dict):
            res = {**res, **{CATEGORY_MEAN_PREFIX + k: v for k, v in res["by_category"]["mean"].items()
                             if not isinstance(v, dict)}}  # a figure per column (not the bounds)
        rows.append({"job": str(path.parent.relative_to(sweep_dir)), **res, "_overrides": read_overrides(path.parent)})
    for path in sorted(sweep_dir.glob("**/error.txt")):
        job = path.parent
        if (job / "results.json").exists():
            continue
        rows.append(_failed_row(sweep_dir, job, path.read_text().strip().splitlines()[0]))
    rows.sort(key=lambda r: (len(r["job"]), r["job"]))  # job order, a failed job in its place (not last)
    swept = swept_keys([r["_overrides"] for r in rows])
    for r in rows:
        r.update({k: r["_overrides"].get(k) for k in swept})
    return rows


def _failed_row(sweep_dir: Path, job: Path, error: str) -> dict:
    """A failed job's row: its error, and its key columns from the job's .hydra/config.yaml."""
    keys = {}
    hcfg = job / ".hydra" / "config.yaml"
    if hcfg.exists():
        c = OmegaConf.load(hcfg)
        sel = lambda k: OmegaConf.select(c, k, throw_on_resolution_failure=False)  # noqa: E731
        keys = {"method": sel("method.name"), "data": sel("data.name"), "category": sel("data.category"),
                "backbone": str(sel("backbone.name") or "").split(".")[0] or None, "seed": sel("seed")}
        keys = {k: (OmegaConf.to_container(v) if OmegaConf.is_config(v) else v) for k, v in keys.items()}
    return {"job": str(job.relative_to(sweep_dir)), **keys, "error": error, "_overrides": read_overrides(job)}


def _table(head: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(b) + " |" for b in body]


def group_over_seeds(rows: list[dict], swept: list[str]) -> dict[tuple, list[dict]]:
    """Successful rows grouped by (method, data, category, backbone, swept non-seed values)."""
    groups = defaultdict(list)
    for r in rows:
        if "error" not in r:
            groups[tuple(str(r.get(k)) for k in (*KEY_COLUMNS[:-1], *swept))].append(r)
    return groups


def summarize(sweep_dir: Path) -> tuple[Path, Path] | None:
    rows = collect(sweep_dir)
    if not rows:
        return None
    swept = swept_keys([r["_overrides"] for r in rows])
    continual = sorted({k for r in rows for k, v in r.items() if k.startswith(CONTINUAL_PREFIXES)  # the figures:
                        and isinstance(v, (int, float)) and not isinstance(v, bool)}) + \
        [CATEGORY_MEAN_PREFIX + k for k in TEST_COLUMNS if any(CATEGORY_MEAN_PREFIX + k in r for r in rows)]
    cols = ["job", *KEY_COLUMNS, *swept, *VALUE_COLUMNS, *continual] + (["error"] if any("error" in r for r in rows) else [])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: (json.dumps(r[c]) if isinstance(r.get(c), list) else r.get(c)) for c in cols})
    csv_path = write_text(sweep_dir / "summary.csv", buf.getvalue())

    lines = _table(cols, [[_fmt(r.get(c)) for c in cols] for r in rows])
    groups = group_over_seeds(rows, swept)
    if any(len(g) > 1 for g in groups.values()):
        lines += ["", "Mean ± std over seeds (sample standard deviation, n - 1; - for one seed):", ""]
        body = []
        for key, g in groups.items():
            cells = list(key) + [str(len(g))]
            for c in (*MEAN_COLUMNS, *continual):
                vals = [r[c] for r in g if isinstance(r.get(c), (int, float))]
                spread = f"{np.std(vals, ddof=1):.4f}" if len(vals) > 1 else "-"
                cells.append(f"{np.mean(vals):.4f} ± {spread}" if vals else "-")
            body.append(cells)
        lines += _table([*KEY_COLUMNS[:-1], *swept, "n", *MEAN_COLUMNS, *continual], body)
    md_path = write_text(sweep_dir / "summary.md", "\n".join(lines) + "\n")
    return csv_path, md_path


def reads_objective(config) -> bool:
    """Whether the sweeper optimises the jobs' returned value (Optuna's does; Hydra's basic grid
    sweeper runs every job and ignores it). Without a sweeper config: assumed to."""
    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
    return not target.endswith(".BasicSweeper")


def check_objective_exists(config: DictConfig) -> None:
    """Refuse a sweep whose every job would fail or return null (each found only trial by trial):
    a continual schedule with test=false (it tests every task after each one), a validation objective
    without held-out normals, or an anomaly-based one without synthetic anomalies (where the sweeper
    reads the objective: a grid sweep runs either way)."""
    metric = config.get("optimized_metric")
    tasks = OmegaConf.select(config, "schedule.tasks", default=None)
    if tasks and not config.get("test", True):
        raise ConfigError("test", "a continual schedule tests every seen task after each task, so its jobs cannot "
                          "run with test=false (set by hparams_search); add test=true: the objective stays the "
                          "routed validation figure, and the test figures are reported beside it")
    if not metric or not reads_objective(config):  # the grid sweeper runs every job and reads no value
        return
    if not OmegaConf.select(config, "data.val_split", default=0.2):
        raise ConfigError("data.val_split", f"optimized_metric={metric} is a validation figure, but data.val_split=0 "
                          "holds out no training normal")
    if metric in ("val_image_auroc", "val_pixel_auroc", "val_pixel_aupro") \
            and OmegaConf.select(config, "data.val_anomalies", default=None) is None:
        raise ConfigError("data.val_anomalies", f"optimized_metric={metric} needs synthetic anomalies in the "
                          "validation set (data.val_anomalies is null); use val_normal_score or val_normal_map_mean")


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # a wrong objective wastes the whole sweep: stop before the first job (Hydra turns a
        # callback's exception into a warning, so this exits, as the CLI does on a config error)
        try:
            check_direction(config.get("optimized_metric"), OmegaConf.select(config, "hydra.sweeper.direction"))
            check_objective_exists(config)
        except ConfigError as err:
            print(f"adtrain: error: {err}", file=sys.stderr)
            sys.exit(2)
        try:
            if where := OmegaConf.select(config, "hydra.sweep.dir"):
                lock_sweep_dir(Path(str(where)))
            prepare_sweep_dir(config)
        except ConfigError as err:
            print(f"adtrain: error: {err}", file=sys.stderr)
            sys.exit(2)
        if where:
            _ACTIVE["dir"] = Path(str(where))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        _ACTIVE.clear()
        rows = _finish(Path(config.hydra.sweep.dir))
        if rows and all("error" in r for r in rows):  # one failed job lets the sweep go on; all failed is an error
            print(f"adtrain: error: every job of the sweep failed ({len(rows)}; the first: {rows[0]['job']}: "
                  f"{rows[0]['error']}); summary.csv's error column says why each did", file=sys.stderr)
            sys.exit(1)


#: the sweep in progress, between on_multirun_start and on_multirun_end (end_broken_sweep)
_ACTIVE: dict[str, Path] = {}


def _finish(sweep_dir: Path) -> list[dict]:
    """summary.csv/.md written and shown, the folder unlocked: the rows."""
    drop_records(sweep_dir)
    try:
        out = summarize(sweep_dir)
    finally:  # the summary written: the folder is free (a crash or kill frees it too, with the process)
        unlock_sweep_dir(sweep_dir)
    if not out:
        return []
    from adtrain.report import show_sweep

    rows = collect(sweep_dir)
    show_sweep(rows, swept_keys([r["_overrides"] for r in rows]), sweep_dir, out)
    return rows


def end_broken_sweep(err: BaseException) -> bool:
    """The sweeper or its launcher raised after jobs had run (Optuna with no completed trial, a job
    killed by the OS under joblib or submitit): Hydra never calls on_multirun_end, so the jobs'
    summary is written here all the same, with one line on why it stopped and how to resume.
    False where no sweep is in progress (the caller reports the error as before)."""
    sweep_dir = _ACTIVE.pop("dir", None)
    if sweep_dir is None:
        return False
    from adtrain.resume import sweep_resume_command

    try:
        _finish(sweep_dir)
    except Exception as summary_err:  # noqa: BLE001 - the sweep's own error is the one to say
        log.error("the summary of %s could not be written: %s", sweep_dir, summary_err)
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    print(f"adtrain: error: the sweep stopped ({type(err).__name__}{': ' + first if first else ''}); the jobs that "
          f"ended are summarised in {sweep_dir}/summary.csv (an error column says why a job failed); once the cause "
          f"is mended, resume it: {sweep_resume_command(sys.argv[1:], sweep_dir)}", file=sys.stderr)
    return True
