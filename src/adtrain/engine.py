"""Fit, select, threshold and evaluate one method on one data module: what a run does.

The one place that trains and tests: `adtrain.run` (the CLI and `adtrain.fit`) and the continual
runner (`adtrain.continual.runner`, task after task) both call `fit_and_select` and
`evaluate_method`; `fit_and_test` is a single-task run's whole sequence. Nothing here locks or
prepares a run directory (adtrain.run does), and nothing before testing opens a test image.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import resource
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from adtrain import distributed
from adtrain.build import build_trainer
from adtrain.errors import ConfigError
from adtrain.io import write_json, write_text
from adtrain.loading import save_method
from adtrain.loggers import log_test_outputs
from adtrain.logs import NO_OPTIMIZER
from adtrain.metrics.image import at_threshold, auroc_by_defect, by_category, sample_auroc

log = logging.getLogger("adtrain")

METRIC_KEYS = (
    "image_auroc", "image_ap", "image_f1max",
    "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro",
)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"


def pick_heatmap_paths(samples, n: int, seed: int) -> set[str]:
    """Up to n test images, half anomalous and half normal where possible, seeded."""
    if n <= 0:
        return set()
    rng = np.random.default_rng(seed)
    anomalous = [s.path for s in samples if s.label == 1]
    normal = [s.path for s in samples if s.label == 0]
    k_a = min(len(anomalous), max(n - len(normal), n // 2 + n % 2))
    k_n = min(len(normal), n - k_a)
    pick = list(rng.permutation(anomalous)[:k_a]) + list(rng.permutation(normal)[:k_n])
    return {str(p) for p in pick}


def has_pixel_truth(dm) -> bool:
    """False only where no test image can have an anomalous ground-truth pixel: masks come from
    files alone (the default sample loader) and no anomalous test sample names one. The pixel
    metrics are then None whatever the maps, so the test skips their per-batch work."""
    from adtrain.data.dataset import reads_files

    loader = getattr(dm, "sample_loader", None)
    if loader is None or not reads_files(loader()):
        return True
    return any(s.label == 1 and s.mask_path for s in dm.test_samples)


def write_scores_csv(path: Path, records: list[dict]) -> None:
    if not records:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(records[0].keys()))
    writer.writeheader()
    writer.writerows(records)
    write_text(path, buf.getvalue())


VAL_RESULT_KEYS = {"val/image_auroc": "val_image_auroc", "val/pixel_auroc": "val_pixel_auroc",
                   "val/pixel_aupro": "val_pixel_aupro", "val/normal_score": "val_normal_score",
                   "val/normal_map_mean": "val_normal_map_mean"}


def fit_and_select(cfg: DictConfig, run_dir: Path, dm, method, logger=None,
                   ckpt_path: str | None = None) -> tuple[object, dict]:
    """Train (or build the memory bank), keep the state selected on the validation set (held-out
    normals + synthetic anomalies made from them; the untrained start too where it is a detector),
    fit the threshold on the held-out normals. Returns (trainer, info); the method is left on the
    trainer's device. Nothing here opens a test image."""
    from adtrain.backbones.feature_cache import attach_feature_cache
    from adtrain.memory.nested import attach_nested_cache
    from adtrain.selection import Selection, describe, resolve_monitor, summary

    run_dir.mkdir(parents=True, exist_ok=True)
    feature_cache = attach_feature_cache(method, cfg)
    nested_cache = attach_nested_cache(method, cfg)
    monitor = resolve_monitor(cfg)
    has_val = len(dm.val_samples) > 0
    if monitor != "last" and not has_val:
        n = len(dm.train_samples)
        why = (f"data.val_split={dm.val_split} of {n} training normal(s) holds out none"
               if dm.val_split else "data.val_split=0 holds out no training normal")
        raise ConfigError("selection.monitor", f"{monitor} needs a validation set, but {why}; set "
                          "data.val_split > 0 (with enough normals) or selection.monitor=last")
    family = monitor.removeprefix("val_image_auroc_") if monitor.startswith("val_image_auroc_") else None
    if family is not None and family not in dm.val_anomalies.families:
        raise ConfigError("selection.monitor", f"{monitor} needs {family} anomalies in the validation set "
                          f"(data.val_anomalies.families={list(dm.val_anomalies.families)})")
    if monitor.startswith(("val_image_auroc", "val_pixel_auroc")) and not dm.val_anomalies.per_normal:
        raise ConfigError("selection.monitor", f"{monitor} needs synthetic anomalies in the validation set "
                          "(data.val_anomalies is empty); use normal_score, normal_map_mean or last")
    sel = cfg.get("selection") or {}
    conf_key = "selection.start_confidence" if sel.get("start_confidence") is not None else "method.start_confidence"
    confidence = sel.get("start_confidence")
    confidence = cfg.method.get("start_confidence", 0.0) if confidence is None else confidence
    if confidence is not None and (isinstance(confidence, bool) or not isinstance(confidence, (int, float))):
        raise ConfigError(conf_key, f"must be a number, got {confidence!r}")
    selector = Selection(monitor, run_dir / "checkpoints", float(confidence or 0.0)) if has_val else None
    every_key = "selection.every_n_epochs" if sel.get("every_n_epochs") is not None else "method.val_every_n_epochs"
    val_every = sel.get("every_n_epochs")
    val_every = cfg.method.get("val_every_n_epochs") if val_every is None else val_every
    if val_every is None:
        val_every = getattr(method, "val_every_n_epochs", None) or 1
    if isinstance(val_every, bool) or not isinstance(val_every, int) or val_every < 1:
        raise ConfigError(every_key, f"must be a whole number >= 1, got {val_every!r}")
    method.val_every_n_epochs = int(val_every)
    trainer, _ = build_trainer(cfg, run_dir, logger, selector, int(val_every))
    method.adtrain_config = OmegaConf.to_container(cfg, resolve=True)

    dm.shuffle_train = not getattr(method, "training_free", False)  # a memory's one pass: in index order
    t0 = time.perf_counter()
    if selector is not None and ckpt_path is None and getattr(method, "start_is_detector", False):
        selector.validate_start(trainer, method, dm)
    with warnings.catch_warnings():
        if getattr(method, "training_free", False):  # one pass, no optimiser: as designed
            warnings.filterwarnings("ignore", message=NO_OPTIMIZER)
        trainer.fit(method, datamodule=dm, ckpt_path=ckpt_path)
    distributed.check_parameters_agree(method)  # DDP: the ranks trained one model
    # a resumed fit counts the time its interrupted session(s) spent too (adtrain.runstate)
    fit_seconds = time.perf_counter() - t0 + sum(getattr(c, "seconds_before", 0.0) for c in trainer.callbacks
                                                 if type(c).__name__ == "RunState")

    choice = selector.choose() if selector is not None else {"selected": "last", "epoch": None, "metrics": {}}
    distributed.barrier()  # rank 0 has written the selected checkpoint every rank restores
    if selector is not None:
        selector.restore(method, choice)
    # a one-pass method takes no optimiser step, so Lightning writes no last.ckpt: the kept state is model.ckpt's
    last_file = "last.ckpt" if (run_dir / "checkpoints" / "last.ckpt").is_file() else "model.ckpt"
    log.info("%s", describe(choice, monitor, selector, int(trainer.current_epoch), last_file))

    device = trainer.strategy.root_device
    method.to(device)
    thr_info = {"threshold": None}
    if has_val:
        with trainer.precision_plugin.forward_context():
            thr_info = fit_threshold(cfg, method, dm)
    else:
        log.warning("No held-out normals (data.val_split=%s of %d training normals holds out none): no decision "
                    "threshold is fitted, so this run's figures are threshold-free (AUROC, AP) and adtrain.predict "
                    "cannot decide with its model.ckpt; hold normals out (data.val_split > 0, with enough training "
                    "images) for a threshold", dm.val_split, len(dm.train_samples))
    distributed.broadcast_buffers(method)  # every rank fitted on all held-out normals; rank 0's values rule
    val_seconds = (selector.val_seconds + (selector.start or {}).get("seconds", 0.0)) if selector else 0.0
    info = {
        "fit_seconds": round(fit_seconds, 3),
        "val_seconds": round(val_seconds, 3),
        "epochs_trained": int(trainer.current_epoch),
        "selected_checkpoint": {"start": "start.ckpt", "epoch": "best.ckpt", "last": last_file}[choice["selected"]],
        "selection": summary(choice, monitor, selector),
        **{VAL_RESULT_KEYS[k]: choice["metrics"].get(k) for k in VAL_RESULT_KEYS},
        "num_val_anomalies": dm.validation_dataset().num_anomalies if has_val else 0,
        "threshold_info": thr_info,
        "feature_cache": feature_cache,
        "nested_cache": nested_cache,
    }
    return trainer, info


def fit_threshold(cfg: DictConfig, method, dm) -> dict:
    """The method's decision threshold on dm's held-out normals (threshold.quantile), or, with
    threshold.mode=val_f1, on its whole validation set (held-out normals and their synthetic anomalies)."""
    f1 = dm.val_dataloader() if cfg.threshold.get("mode", "quantile") == "val_f1" else None
    info = method.fit_threshold(dm.val_normal_dataloader(), cfg.threshold.quantile, f1_dataloader=f1)
    if f1 is not None and info.get("threshold_mode") != "val_f1" and info.get("threshold") is not None:
        log.warning("threshold.mode=val_f1: the validation set holds no synthetic anomaly (or no normal) to take "
                    "an F1 on; the threshold is threshold.quantile of the held-out normals' scores")
    return info


def cache_states(dm, feature_cache, nested_cache=None) -> dict:
    """What the caches did: image_cache / feature_cache / nested_cache off | hit | miss (image_cache also skipped,
    feature_cache unwritable: asked for, but the folder took no entry) (results.json)."""
    image_cache = getattr(dm, "image_cache", None)
    return {"image_cache": image_cache.state() if image_cache is not None else "off",
            "feature_cache": feature_cache.state() if feature_cache is not None else "off",
            "feature_cache_lookups": ({"hit": feature_cache.hits, "miss": feature_cache.misses}
                                      if feature_cache is not None else None),
            "nested_cache": nested_cache.state() if nested_cache is not None else "off",
            "nested_cache_lookups": nested_cache.report() if nested_cache is not None else None}


def evaluate_method(cfg: DictConfig, trainer, method, dm, heatmap_dir: Path | None, per_category: bool = True) -> dict:
    """Test on dm's test set: the seven metrics, timing and peak memory (heatmaps if a dir is given);
    per_category: each category's pixel metrics too where dm holds several (``test_breakdown``)."""
    device = trainer.strategy.root_device
    method.heatmap_dir = heatmap_dir if cfg.output.heatmaps else None
    method.heatmap_size = int(cfg.output.get("heatmap_size") or 320)
    method.heatmap_paths = (pick_heatmap_paths(dm.test_samples, int(cfg.output.heatmaps), int(cfg.seed))
                            if method.heatmap_dir is not None else set())
    picked = [str(s.path) for s in dm.test_samples if str(s.path) in method.heatmap_paths]
    method.heatmap_numbers = {p: k for k, p in enumerate(picked)}  # names numbered in test order, on any rank
    if device.type == "cuda":
        torch.zeros(1, device=device)  # a fresh process (adtrain.test) has no CUDA allocator yet to reset
        torch.cuda.reset_peak_memory_stats(device)
    labels = {int(s.label) for s in dm.test_samples}
    if len(labels) == 1:  # said before the test, not left to a null in the table
        log.warning("The test set holds %s (%d images): image AUROC, AP and F1-max are undefined (null)",
                    "no anomalous image" if labels == {0} else "no normal image", len(dm.test_samples))
    t1 = time.perf_counter()
    pixel_before = method.pixel_metrics
    method.pixel_metrics = pixel_before and has_pixel_truth(dm)
    several = len(getattr(dm, "categories", ()))
    method.pixel_by_category = several if per_category and method.pixel_metrics and several > 1 else 0
    method.spro_groups = dm.spro_groups() if per_category and method.pixel_metrics else {}
    dm.test_regions = bool(method.spro_groups)
    at_source = method.pixel_metrics and method.pixel_resolution == "source"
    dm.test_source_truth = at_source  # items carry their ground truth at the images' own sizes
    method.source_geometry = (tuple(dm.image_size), tuple(dm.center_crop) if dm.center_crop else None)
    try:
        trainer.test(method, datamodule=dm, verbose=False)
    finally:
        method.pixel_metrics, method.pixel_by_category, method.spro_groups = pixel_before, 0, {}
        dm.test_regions = dm.test_source_truth = False
    metrics = method.test_results()
    auspro = method.test_results_spro()
    pixels_decided = method.test_pixels_at_threshold()
    exactness = method.pixel_exactness()
    empty = empty_anomaly_masks(method)
    distributed.check_agree({k: metrics.get(k) for k in METRIC_KEYS}, "test metrics")  # DDP: one answer
    test_seconds = time.perf_counter() - t1
    peak, peak_kind = peak_memory_mb(device)
    n_test = len(method.test_records)  # images actually scored (trainer.limit_test_batches may cut the set)
    return {
        **{k: metrics.get(k) for k in METRIC_KEYS},
        **exactness,
        # where the pixel figures were taken (metrics.resolution; null without pixel metrics)
        "pixel_resolution": ("source" if at_source else "run") if exactness["pixel_metrics_exact"] is not None else None,
        "pixel_aupro_fpr_limit": method.aupro_fpr_limit,  # adtrain.test can score at another limit
        "empty_anomaly_masks": empty,
        **({"pixel_by_category": grouped} if (grouped := method.test_results_by_category()) else {}),
        "auspro": auspro,
        "pixel_test_at_threshold": pixels_decided,
        "test_seconds": round(test_seconds, 3),
        "test_images_per_second": round(n_test / test_seconds, 3) if test_seconds > 0 else None,
        "peak_memory_mb": round(peak, 1),
        "peak_memory_kind": peak_kind,
        "num_test": n_test,
    }


#: results.json's figures of parts of the test set, and of its decisions (test_breakdown)
BREAKDOWN_KEYS = ("image_auroc_by_defect", "by_category", "sample_auroc", "test_at_threshold")


def test_breakdown(method, tested: dict, dm) -> dict:
    """From a finished test (``evaluate_method``'s figures and the method's score rows): each defect
    type's image AUROC, each category's figures (several categories), the AUROC of samples seen
    from several views (``dm.sample_group``), the decisions at the threshold."""
    records = method.test_records
    return {"image_auroc_by_defect": auroc_by_defect(records),
            "by_category": by_category(records, tested.get("pixel_by_category")),
            "sample_auroc": sample_auroc(records, getattr(dm, "sample_group", lambda path: None)),
            "test_at_threshold": at_threshold(records)}


def empty_anomaly_masks(method) -> int | None:
    """How many anomalous test images have no anomalous pixel in their mask (None without pixel
    metrics); said in the log when there are any, as their pixels count as normal."""
    ev = method.evaluator
    if ev is None or not getattr(ev, "pixel_metrics", False):  # (every mask empty: no region, still said)
        return None
    empty = int(getattr(ev, "empty_masks", 0))
    if empty:
        log.warning("%d anomalous test image(s) have no anomalous pixel in their mask at the size the pixel "
                    "metrics are taken at (an empty mask file, or, at the run's size, a defect too small to "
                    "survive the resize): they count for the image "
                    "metrics, and their pixels as normal ones in the pixel metrics", empty)
    return empty


def _category(cfg: DictConfig, dm):
    """The category as the data module reads it (BTAD's data.category=3 is its folder "03"), else as configured."""
    category = getattr(dm, "category", None)
    if isinstance(category, str) or (isinstance(category, list) and OmegaConf.is_list(cfg.data.category)):
        return list(category) if isinstance(category, list) else category
    return OmegaConf.to_container(cfg.data.category) if OmegaConf.is_list(cfg.data.category) else cfg.data.category


def fit_and_test(cfg: DictConfig, run_dir: Path, dm, method, logger=None, ckpt_path: str | None = None) -> dict:
    """Train (or build the memory bank), select on the validation set, threshold, then test
    (unless test=false: a sweep's jobs never open the test set)."""
    trainer, info = fit_and_select(cfg, run_dir, dm, method, logger, ckpt_path)
    do_test = bool(cfg.get("test", True))
    model_ckpt = run_dir / "checkpoints" / "model.ckpt"
    if do_test:  # the fitted model (threshold included) is kept before testing: a test that fails on its
        save_method(method, model_ckpt)  # data (an unreadable image) leaves it to adtrain.test, not to a new fit
    start_test = _test_start(cfg, trainer, method, dm, run_dir) if do_test else None
    tested = evaluate_method(cfg, trainer, method, dm, run_dir / "heatmaps") if do_test else {}
    device = trainer.strategy.root_device
    results = {
        "method": cfg.method.name,
        "data": cfg.data.name,
        "category": _category(cfg, dm),
        "backbone": str(cfg.backbone.name).split(".")[0],
        "seed": int(cfg.seed),
        "tested": do_test,
        **{k: tested.get(k) for k in METRIC_KEYS},
        "pixel_metrics_exact": tested.get("pixel_metrics_exact"),
        "pixel_resolution": tested.get("pixel_resolution"),
        "pixel_aupro_fpr_limit": method.aupro_fpr_limit,
        "pixel_error_bounds": tested.get("pixel_error_bounds"),
        "empty_anomaly_masks": tested.get("empty_anomaly_masks"),
        "auspro": tested.get("auspro"),
        "pixel_test_at_threshold": tested.get("pixel_test_at_threshold"),
        **(test_breakdown(method, tested, dm) if do_test else dict.fromkeys(BREAKDOWN_KEYS)),
        **{k: info[k] for k in VAL_RESULT_KEYS.values()},
        "fit_seconds": info["fit_seconds"],
        "val_seconds": info["val_seconds"],
        "test_seconds": tested.get("test_seconds"),
        "test_images_per_second": tested.get("test_images_per_second"),
        "peak_memory_mb": tested.get("peak_memory_mb"),
        "peak_memory_kind": tested.get("peak_memory_kind"),
        "num_train": len(dm.train_samples),
        "num_val": len(dm.val_samples),
        "num_val_anomalies": info["num_val_anomalies"],
        "num_test": tested.get("num_test"),
        "epochs_trained": info["epochs_trained"],
        "selected_checkpoint": info["selected_checkpoint"],
        "selection": info["selection"],
        **({"start_test": start_test} if start_test is not None else {}),
        "device": str(device),
        "precision": str(cfg.trainer.precision),
        **cache_states(dm, info["feature_cache"], info["nested_cache"]),
        **info["threshold_info"],
    }
    save_method(method, model_ckpt, {"results": results})
    if do_test:
        if cfg.output.scores_csv:
            write_scores_csv(run_dir / "scores.csv", method.test_records)
        _histogram(run_dir, method, str(results.get("threshold_mode") or "quantile"))
    if distributed.is_writer():
        log_test_outputs(logger, results, method.test_records if do_test else [],
                         method.heatmap_files if do_test else [], model_ckpt, tested=do_test)
    # last: results.json says the run finished (resume refuses it, Run.open reads it), so a kill or an error
    # before this leaves a run that resume=true finishes, never one without its scores.csv or logged test
    write_json(run_dir / "results.json", results)
    distributed.barrier()  # the other ranks wait until rank 0 has written the run's files
    return results


def _test_start(cfg: DictConfig, trainer, method, dm, run_dir: Path) -> dict | None:
    """test_start=true: also test the untrained start (training beside its start on the same test
    set, for reports); the selected state is put back before it is tested."""
    start = run_dir / "checkpoints" / "start.ckpt"
    if not cfg.get("test_start", False):
        return None
    if not start.exists():  # a one-pass method (PatchCore, HETMM) or one without a selection keeps none
        log.warning("test_start=true: %s has no untrained start (start.ckpt) to test", cfg.method.get("name"))
        return None
    kept = {k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
            for k, v in method.state_dict().items()}
    from adtrain.loading import read_checkpoint

    method.load_state_dict(read_checkpoint(start)["state_dict"])
    method.to(trainer.strategy.root_device)
    with trainer.precision_plugin.forward_context():
        fit_threshold(cfg, method, dm)
    tested = evaluate_method(cfg, trainer, method, dm, None)
    method.load_state_dict(kept)
    return {k: tested[k] for k in METRIC_KEYS}


def _histogram(run_dir: Path, method, mode: str) -> None:
    if not method.test_records:
        return
    from adtrain.viz import score_histogram

    scores = np.array([r["score"] for r in method.test_records])
    labels = np.array([r["label"] for r in method.test_records])
    thr = float(method.threshold)
    score_histogram(scores, labels, thr if np.isfinite(thr) else None, run_dir / "score_histogram.png", mode)
