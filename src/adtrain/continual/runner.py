"""A continual run: train task after task, evaluate every task seen so far, resume after a crash.

Protocol (docs/continual.md): task t trains on its own training normals only (plus, if
schedule.replay > 0, a bounded, counted buffer of earlier tasks' training images), is selected and
thresholded on its own held-out normals, then the one model is tested on the test set of every task
seen so far, each separately and without being told which task an image comes from.

Routed validation (schedule.routed_val, default ``last``): after the last task (``all``: after
every task) the validation set of every task seen so far is scored as its test set is, through the
model's routing, and the averages of the last row are the run's ``val_*`` figures (a sweep's
objective). Each task's own-state figures stay in ``per_task`` and ``own_state_val``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from lightning.pytorch import seed_everything
from omegaconf import DictConfig

from adtrain.build import build_datamodule, build_logger, build_method
from adtrain.continual.metrics import category_mean, is_figure, summarize, with_categories
from adtrain.continual.outputs import log_final, log_row, plot_matrix
from adtrain.continual.schedule import Schedule, read_schedule, task_config, task_name
from adtrain.continual.state import (MATRIX_METRICS, ContinualState, load_task_checkpoint, save_task_checkpoint,
                                     task_checkpoint, task_dir)
from adtrain.data.base import seeded_rng
from adtrain.errors import CategoryNotFound, ConfigError
from adtrain import distributed
from adtrain.io import write_json
from adtrain.loggers import is_wandb, task_prefix
from adtrain.data.file_checks import check_files
from adtrain.engine import (METRIC_KEYS, VAL_RESULT_KEYS, cache_states, evaluate_method, fit_and_select,
                            write_scores_csv)

log = logging.getLogger("adtrain")


def _build_task_dm(cfg: DictConfig, cats: list[str], t: int | str):
    try:
        return build_datamodule(task_config(cfg, cats))
    except (ConfigError, CategoryNotFound) as err:  # the category came from schedule.tasks, not data.category
        if isinstance(err, CategoryNotFound) or err.key == "data.category":
            raise ConfigError("schedule.tasks", f"task {t} ({task_name(cats)}) does not fit data={cfg.data.name}: "
                              f"{err}") from None
        raise


def replay_buffer(own_train: list[list], t: int, per_task: int, seed: int, names: list[str]) -> list:
    """At most per_task training images of each finished task j < t (seeded by the task's name)."""
    out = []
    for j in range(t):
        pool = own_train[j]
        k = min(per_task, len(pool))
        pick = sorted(seeded_rng(seed, "replay", names[j]).choice(len(pool), k, replace=False).tolist())
        out += [pool[p] for p in pick]
    return out


def finite_mean(values) -> float | None:
    """The mean of the finite numbers among values (None, NaN skipped); None if there are none."""
    vals = [float(v) for v in values if is_figure(v)]
    return float(np.mean(vals)) if vals else None


class _Sequence:
    """The state of one run_schedule call (kept small: the loop body lives in train_task)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, sched: Schedule, state: ContinualState):
        self.cfg, self.run_dir, self.sched, self.state = cfg, run_dir, sched, state
        self.names = sched.task_names
        # every data module first: a category that does not exist fails before any training
        self.eval_dms = [_build_task_dm(cfg, cats, t) for t, cats in enumerate(sched.tasks)]
        self.train_dms = ([_build_task_dm(cfg, sched.train_tasks[0], "joint")] if sched.joint else self.eval_dms)
        for dm in {id(d): d for d in [*self.eval_dms, *self.train_dms]}.values():
            check_files(dm, test=True)  # a bad file of any task fails now, not after the tasks before it
        self.own_train = [list(dm.train_samples) for dm in self.train_dms]
        # seeded first: the same seed builds the same initial weights (and so the same result)
        seed_everything(int(cfg.seed), workers=True, verbose=False)
        self.method = build_method(cfg)
        # train/eval flag of every submodule as built: what a single run's fit starts from
        self.modes = {name: m.training for name, m in self.method.named_modules()}
        self.logger = build_logger(cfg, run_dir)
        self.records: list[dict] = []
        self.device = None

    def restore(self) -> None:
        last = self.state.finished[-1]
        load_task_checkpoint(self.method, task_checkpoint(self.run_dir, last))
        log.info("Resuming the sequence after task %d (%s); finished tasks are not redone", last, self.names[last])
        # csv/metrics.csv kept the rows it holds (build._keep_csv_rows); a new W&B run holds none: each
        # finished task without its row gets it now, so every task's row is there once
        logged = getattr(self.logger, "adtrain_logged_tasks", set())
        for entry in self.state.per_task:
            if entry["task"] not in logged:
                log_row(self.logger, entry["task"], {e["task"]: e for e in entry["evaluations"]}, self.names)

    def train_task(self, t: int, resuming: bool) -> None:
        cfg, sched = self.cfg, self.sched
        cats = sched.train_tasks[t]
        n_train = len(sched.train_tasks)
        seed_everything(int(cfg.seed) + t, workers=True, verbose=False)
        tcfg = task_config(cfg, cats)
        dm = self.train_dms[t]
        replayed = 0
        if sched.replay > 0 and not sched.joint:
            buffer = replay_buffer(self.own_train, t, sched.replay, int(cfg.seed), self.names)
            dm.train_samples[:] = self.own_train[t] + buffer
            replayed = len(buffer)
        tdir = task_dir(self.run_dir, t)
        last = tdir / "checkpoints" / "last.ckpt"
        ckpt_path = str(last) if resuming and last.exists() else None
        log.info("Task %d (%d of %d): %s (%d training images%s)%s", t, t + 1, n_train, task_name(cats),
                 len(dm.train_samples), f", {replayed} replayed" if replayed else "",
                 f", resuming from {last}" if ckpt_path else "")

        # evaluation left the method in eval mode and Lightning's fit does not switch it back: restore
        # the modes it was built with (frozen backbones stay in eval mode, trained parts train)
        for name, m in self.method.named_modules():
            m.training = self.modes.get(name, m.training)
        self.method.begin_task(t, list(cats))
        with task_prefix(self.logger, t, n_train):
            trainer, info = fit_and_select(tcfg, tdir, dm, self.method, self.logger, ckpt_path)
        self.method.end_task(t, list(cats))
        self.device = str(trainer.strategy.root_device)

        final_row = t == n_train - 1
        seen = range(len(sched.tasks)) if sched.joint else range(t + 1)
        own = info["threshold_info"]
        own["threshold_tasks"] = list(seen) if sched.joint else [t]  # joint: one task of every category
        if final_row and t > 0 and sched.threshold == "seen" and not self.method.decides_per_task:
            info["threshold_info"] = self.fit_seen_threshold(trainer, list(seen), own)
        calibrated = getattr(self.method, "calibrated_threshold_info", lambda: None)()
        if calibrated is not None:  # DFM: end_task put the threshold in its tasks' units, averaged
            info["threshold_info"] = {**own, **calibrated, "task_threshold": own.get("threshold")}
        evals: dict[int, dict] = {}
        for i in seen:
            heatmaps = self.run_dir / "heatmaps" / f"task_{i}" if final_row else None
            figures = evaluate_method(tcfg, trainer, self.method, self.eval_dms[i], heatmaps)
            evals[i] = with_categories(figures, self.method.test_records)  # a grouped task's categories too
            if final_row:
                self.records += [{"task": i, **r} for r in self.method.test_records]
            log.info("  after task %d, task %d (%s): %s", t, i, self.names[i],
                     ", ".join(f"{m}={evals[i][m]:.4f}" for m in MATRIX_METRICS if evals[i].get(m) is not None))
        routed, t_routed = {}, time.perf_counter()
        if len(sched.tasks) > 1 and not sched.joint and (sched.routed_val == "all"
                                                         or (sched.routed_val == "last" and final_row)):
            for i in seen:
                routed[i] = validate_routed(trainer, self.method, self.eval_dms[i], i)
                log.info("  after task %d, routed validation of task %d (%s): %s", t, i, self.names[i],
                         ", ".join(f"{k}={v:.4f}" for k, v in routed[i].items()))
        thr = info.pop("threshold_info")
        caches = cache_states(dm, info.pop("feature_cache"), info.pop("nested_cache", None))
        entry = {
            "task": t, "name": task_name(cats), "categories": list(cats),
            "num_train": len(self.own_train[t]), "num_val": len(dm.val_samples), "replay_images": replayed,
            **info, **thr, **caches, "device": self.device,
            "evaluations": [{"task": i, "name": self.names[i], **evals[i]} for i in seen],
            "routed_validation": [{"task": i, "name": self.names[i], **routed[i]} for i in routed],
            "routed_val_seconds": round(time.perf_counter() - t_routed, 3) if routed else 0.0,
        }
        save_task_checkpoint(self.method, task_checkpoint(self.run_dir, t),
                             {"task": t, "categories": list(cats), "schedule": sched.as_dict()})
        self.state.record(t, entry, evals)
        if final_row and self.cfg.output.scores_csv and self.records:
            # before the state lists the last task as finished: a resume after it runs no test again
            write_scores_csv(self.run_dir / "scores.csv", self.records)
        self.state.save(self.run_dir)
        log_row(self.logger, t, evals, self.names)

    def fit_seen_threshold(self, trainer, seen: list[int], own: dict) -> dict:
        """The final model's decision threshold (and display centres) on the held-out normals of every
        seen task (schedule.threshold=seen): one threshold decides every task's images, so it is fitted
        on all of them, not on the last task's alone (which flagged most normals of an earlier task whose
        scores run higher). The same validation sets the routed validation scores; no test image."""
        loaders = [self.eval_dms[i].val_normal_dataloader() for i in seen]
        f1 = (_Chained([self.eval_dms[i].val_dataloader() for i in seen])  # their synthetic anomalies too
              if self.cfg.threshold.get("mode", "quantile") == "val_f1" else None)
        with trainer.precision_plugin.forward_context():
            fitted = self.method.fit_threshold(_Chained(loaders), self.cfg.threshold.quantile, f1_dataloader=f1)
        distributed.broadcast_buffers(self.method)
        if fitted.get("threshold") is None:  # no task holds normals out: the last task's (none) stays
            return own
        log.info("  threshold %.4f on the held-out normals of tasks %s (%d images; task %d's own: %s)",
                 fitted["threshold"], seen, fitted["num_threshold_images"], seen[-1], _fmt(own.get("threshold")))
        return {**fitted, "threshold_tasks": seen, "task_threshold": own.get("threshold")}

    def finish(self) -> dict:
        cfg, sched, state = self.cfg, self.sched, self.state
        summary = summarize(state.matrices)
        last_evals = state.per_task[-1]["evaluations"]
        by_category = category_mean(last_evals, METRIC_KEYS)  # tasks that group several categories
        if by_category is not None:
            summary.update({f"final_category_mean_{m}": by_category["mean"][m] for m in MATRIX_METRICS})
        all_evals = [e for p in state.per_task for e in p["evaluations"]]
        final_test_seconds = sum(e["test_seconds"] for e in last_evals)
        summary.update({
            "num_tasks": len(sched.tasks),
            "fit_seconds": round(sum(p["fit_seconds"] for p in state.per_task), 3),
            "test_seconds": round(sum(e["test_seconds"] for e in all_evals), 3),
            "replay_images_total": sum(p["replay_images"] for p in state.per_task),
        })
        heatmaps = {}
        for m, R in state.matrices.items():
            if all(v is None for row in R for v in row):  # not measured (pixel metrics of data without masks)
                continue
            sub = f"final {_fmt(summary[f'final_{m}'])}, forgetting {_fmt(summary[f'forgetting_{m}'])}"
            heatmaps[m] = plot_matrix(R, self.names, m, self.run_dir / f"matrix_{m}.png", sched.joint, sub)
        peaks = [e["peak_memory_mb"] for e in all_evals if e.get("peak_memory_mb") is not None]
        # each task's validation figures (its selected state, its own validation set), averaged
        own_val = {k: finite_mean(p.get(k) for p in state.per_task) for k in VAL_RESULT_KEYS.values()}
        last_routed = state.per_task[-1].get("routed_validation") or []
        routed_val = ({v: finite_mean(r.get(k) for r in last_routed) for k, v in VAL_RESULT_KEYS.items()}
                      if last_routed else None)
        n_final = sum(e["num_test"] for e in last_evals)
        results = {
            "method": cfg.method.name,
            "data": cfg.data.name,
            "category": sched.name,
            "backbone": str(cfg.backbone.name).split(".")[0],
            "seed": int(cfg.seed),
            # final averages over tasks (last row), so sweep summaries read a continual run like any other
            **{k: finite_mean(e.get(k) for e in last_evals) for k in METRIC_KEYS},
            "pixel_resolution": next((e["pixel_resolution"] for e in last_evals if e.get("pixel_resolution")), None),
            # validation as the test keys: the last row's routed validation, averaged over tasks (a sweep's
            # objective); without it (routed_val=off, one task, joint) each task's own-state figures, averaged
            **(routed_val or own_val),
            "val_source": "routed" if routed_val else "own_state",
            "own_state_val": own_val,
            "fit_seconds": summary["fit_seconds"],
            "test_seconds": summary["test_seconds"],
            "test_images_per_second": round(n_final / final_test_seconds, 3) if final_test_seconds > 0 else None,
            "peak_memory_mb": max(peaks) if peaks else None,
            "device": self.device or state.per_task[-1].get("device"),
            "precision": str(cfg.trainer.precision),
            "schedule": {**sched.as_dict(), "threshold": sched.threshold, "routed_val": sched.routed_val},
            "tasks": sched.tasks,
            "task_names": self.names,
            "continual_behaviour": getattr(self.method, "continual_behaviour", None),
            "summary": summary,
            **({"final_by_category": by_category} if by_category is not None else {}),
            "matrices": state.matrices,
            "per_task": state.per_task,
            "final_checkpoint": str(task_checkpoint(Path("."), state.finished[-1])),
        }
        if cfg.output.scores_csv and self.records:
            write_scores_csv(self.run_dir / "scores.csv", self.records)
        final_heatmaps = {name: sorted((self.run_dir / "heatmaps" / f"task_{i}").glob("*.png"))
                          for i, name in enumerate(self.names)}
        log_final(self.logger, results, heatmaps, final_heatmaps, self.records,
                  task_checkpoint(self.run_dir, state.finished[-1]))
        # last: results.json says the sequence finished; a kill or an error before this leaves one that
        # resume=true finishes (its tasks are not redone), never one without its plots, scores or logged summary
        write_json(self.run_dir / "results.json", results)
        distributed.barrier()  # DDP: the other ranks wait until rank 0 has written the run's files
        return results  # adtrain.run shows its table (final and forgetting of each metric)


class _Chained:
    """Several data loaders read one after the other (with a length, as fit_threshold wants)."""

    def __init__(self, loaders: list):
        self.loaders = loaders

    def __len__(self) -> int:
        return sum(len(d) for d in self.loaders)

    def __iter__(self):
        for d in self.loaders:
            yield from d


def validate_routed(trainer, method, dm, task: int | None = None) -> dict[str, float]:
    """dm's validation set scored as its test set is (the finished tasks' routing): the val/ figures.
    The logger gets them as ``routed_val/task<i>/<figure>``, apart from the training's ``val/`` curves."""
    method.log_validation = False
    try:
        trainer.validate(method, datamodule=dm, verbose=False)
    finally:
        method.log_validation = True
    figures = {k: float(v) for k, v in (getattr(method, "last_val_metrics", {}) or {}).items()}
    if trainer.logger is not None and task is not None and figures:
        trainer.logger.log_metrics({f"routed_val/task{task}/{k.removeprefix('val/')}": v for k, v in figures.items()},
                                   step=trainer.global_step)
    return figures


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "n/a"


def run_schedule(cfg: DictConfig, run_dir: Path) -> dict:
    """Run cfg.schedule's task sequence in run_dir (resume=true continues an interrupted one)."""
    run_dir = Path(run_dir)
    if not cfg.get("test", True):
        raise ConfigError("test", "a continual schedule evaluates every seen task after each task; test=false "
                          "(validation only) is for single-task runs")
    run_dir.mkdir(parents=True, exist_ok=True)
    sched = read_schedule(cfg)
    fresh = ContinualState(schedule=sched.as_dict(), method=str(cfg.method.name), data=str(cfg.data.name))
    resume = bool(cfg.get("resume", False))
    if resume:
        state = ContinualState.load(run_dir)
        state.check_same_run(fresh)
    else:
        state = fresh
    seq = _Sequence(cfg, run_dir, sched, state)
    if not resume:
        state.save(run_dir)
    ok = False
    try:
        if state.finished:
            seq.restore()
        first = state.next_task
        for t in range(first, len(sched.train_tasks)):
            seq.train_task(t, resuming=resume and t == first)
        results = seq.finish()
        ok = True
        return results
    finally:
        if is_wandb(seq.logger):
            seq.logger.experiment.finish(exit_code=0 if ok else 1)
