"""One run: fit, select on held-out normals, fit the threshold, test, write results.

Everything lands in the run directory: results.json, config.yaml, checkpoints/ (best, last,
model.ckpt with the threshold), heatmaps/, scores.csv, score_histogram.png.
"""

from __future__ import annotations

import csv
import io
import logging
import resource
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import seed_everything
from omegaconf import DictConfig, OmegaConf

from adtrain.build import build_datamodule, build_logger, build_method, build_trainer
from adtrain.errors import ConfigError
from adtrain.checkpoint import save_method
from adtrain.io import write_json, write_text
from adtrain.loggers import log_test_outputs

log = logging.getLogger("adtrain")

METRIC_KEYS = (
    "image_auroc", "image_ap", "image_f1max",
    "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro",
)


def run_dir_from_hydra(default: str = ".") -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(default)


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


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    if not cfg.get("resume", False):
        return None
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.exists():
        raise ConfigError(
            "resume",
            f"no checkpoint to resume from at {last}. Pass the interrupted run's directory: "
            "hydra.run.dir=<that run dir> resume=true",
        )
    log.info("Resuming from %s", last)
    return str(last)


def write_scores_csv(path: Path, records: list[dict]) -> None:
    if not records:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(records[0].keys()))
    writer.writeheader()
    writer.writerows(records)
    write_text(path, buf.getvalue())


def fit_and_select(cfg: DictConfig, run_dir: Path, dm, method, logger=None,
                   ckpt_path: str | None = None) -> tuple[object, dict]:
    """Train (or build the memory bank), reload the checkpoint selected on held-out normals,
    fit the threshold on them. Returns (trainer, info); the method is left on the trainer's device."""
    run_dir.mkdir(parents=True, exist_ok=True)
    # selection on held-out normals, unless the method says its last state is the one to keep
    select_last = getattr(method, "select_last", False)
    monitor = "val/normal_score" if len(dm.val_samples) > 0 and not select_last else None
    trainer, ckpt_cb = build_trainer(cfg, run_dir, logger, monitor)
    method.adtrain_config = OmegaConf.to_container(cfg, resolve=True)

    t0 = time.perf_counter()
    trainer.fit(method, datamodule=dm, ckpt_path=ckpt_path)
    fit_seconds = time.perf_counter() - t0

    best = ckpt_cb.best_model_path
    if best and Path(best).exists():
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        method.load_state_dict(state)
        log.info("Selected checkpoint %s (val/normal_score %.6g)", Path(best).name, float(ckpt_cb.best_model_score or float("nan")))

    device = trainer.strategy.root_device
    method.to(device)
    thr_info = {"threshold": None}
    if len(dm.val_samples) > 0:
        with trainer.precision_plugin.forward_context():
            thr_info = method.fit_threshold(dm.val_dataloader(), cfg.threshold.quantile)
    info = {
        "fit_seconds": round(fit_seconds, 3),
        "epochs_trained": int(trainer.current_epoch),
        "selected_checkpoint": Path(best).name if best else None,
        "threshold_info": thr_info,
    }
    return trainer, info


def evaluate_method(cfg: DictConfig, trainer, method, dm, heatmap_dir: Path | None) -> dict:
    """Test on dm's test set: the seven metrics, timing and peak memory (heatmaps if a dir is given)."""
    device = trainer.strategy.root_device
    method.heatmap_dir = heatmap_dir if cfg.output.heatmaps else None
    method.heatmap_paths = (pick_heatmap_paths(dm.test_samples, int(cfg.output.heatmaps), int(cfg.seed))
                            if method.heatmap_dir is not None else set())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t1 = time.perf_counter()
    trainer.test(method, datamodule=dm, verbose=False)
    metrics = method.test_results()
    test_seconds = time.perf_counter() - t1
    peak, peak_kind = peak_memory_mb(device)
    n_test = len(method.test_records)  # images actually scored (trainer.limit_test_batches may cut the set)
    return {
        **{k: metrics.get(k) for k in METRIC_KEYS},
        "test_seconds": round(test_seconds, 3),
        "test_images_per_second": round(n_test / test_seconds, 3) if test_seconds > 0 else None,
        "peak_memory_mb": round(peak, 1),
        "peak_memory_kind": peak_kind,
        "num_test": n_test,
    }


def fit_and_test(cfg: DictConfig, run_dir: Path, dm, method, logger=None, ckpt_path: str | None = None) -> dict:
    """Train (or build the memory bank), select on held-out normals, threshold, test."""
    trainer, info = fit_and_select(cfg, run_dir, dm, method, logger, ckpt_path)
    tested = evaluate_method(cfg, trainer, method, dm, run_dir / "heatmaps")
    device = trainer.strategy.root_device
    results = {
        "method": cfg.method.name,
        "data": cfg.data.name,
        "category": OmegaConf.to_container(cfg.data.category) if OmegaConf.is_list(cfg.data.category) else cfg.data.category,
        "backbone": str(cfg.backbone.name).split(".")[0],
        "seed": int(cfg.seed),
        **{k: tested[k] for k in METRIC_KEYS},
        "fit_seconds": info["fit_seconds"],
        "test_seconds": tested["test_seconds"],
        "test_images_per_second": tested["test_images_per_second"],
        "peak_memory_mb": tested["peak_memory_mb"],
        "peak_memory_kind": tested["peak_memory_kind"],
        "num_train": len(dm.train_samples),
        "num_val": len(dm.val_samples),
        "num_test": tested["num_test"],
        "epochs_trained": info["epochs_trained"],
        "selected_checkpoint": info["selected_checkpoint"],
        "device": str(device),
        "precision": str(cfg.trainer.precision),
        **info["threshold_info"],
    }
    model_ckpt = run_dir / "checkpoints" / "model.ckpt"
    save_method(method, model_ckpt, {"results": results})
    write_json(run_dir / "results.json", results)
    if cfg.output.scores_csv:
        write_scores_csv(run_dir / "scores.csv", method.test_records)
    _histogram(run_dir, method)
    log_test_outputs(logger, results, method.test_records, method.heatmap_files, model_ckpt)
    return results


def _histogram(run_dir: Path, method) -> None:
    if not method.test_records:
        return
    from adtrain.viz import score_histogram

    scores = np.array([r["score"] for r in method.test_records])
    labels = np.array([r["label"] for r in method.test_records])
    thr = float(method.threshold)
    score_histogram(scores, labels, thr if np.isfinite(thr) else None, run_dir / "score_histogram.png")


def run(cfg: DictConfig, run_dir: Path | None = None) -> dict:
    """The whole run for `python -m adtrain`: a single task, or a continual schedule."""
    run_dir = Path(run_dir) if run_dir is not None else run_dir_from_hydra()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.get("schedule") is not None and cfg.schedule.get("tasks"):
        from adtrain.continual.runner import run_schedule

        return run_schedule(cfg, run_dir)
    seed_everything(int(cfg.seed), workers=True, verbose=False)
    ckpt_path = resume_checkpoint(cfg, run_dir)
    dm = build_datamodule(cfg)
    method = build_method(cfg)
    logger = build_logger(cfg, run_dir)
    try:
        results = fit_and_test(cfg, run_dir, dm, method, logger, ckpt_path)
    finally:
        if logger is not None and hasattr(logger, "experiment") and type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()
    _print_summary(results, run_dir)
    return results


def _print_summary(results: dict, run_dir: Path) -> None:
    shown = {k: results.get(k) for k in METRIC_KEYS + ("fit_seconds", "test_images_per_second")}
    text = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
    log.info("%s on %s/%s: %s", results["method"], results["data"], results["category"], text)
    log.info("results: %s", run_dir / "results.json")
