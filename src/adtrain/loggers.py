"""Experiment loggers beyond Lightning's own: W&B with an automatic offline fallback."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger("adtrain")


def _wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_logger(
    project: str = "adtrain",
    entity: str | None = None,
    name: str | None = None,
    group: str | None = None,
    tags: list | None = None,
    mode: str = "auto",
    save_dir: str = ".",
    log_checkpoint: bool = True,
):
    """A Lightning WandbLogger; `mode=auto` follows the WANDB_MODE environment variable where it is set,
    else goes offline (and says so) when no API key is set."""
    from lightning.pytorch.loggers import WandbLogger

    _check_modes(mode)
    env = os.environ.get("WANDB_MODE")
    if mode == "auto" and env:  # W&B's own switch (offline compute nodes): a mode passed to wandb.init beats it
        mode = env
        log.info("W&B: WANDB_MODE=%s (logger.mode=auto follows it)", env)
    elif mode == "auto":
        mode = "online" if _wandb_key_available() else "offline"
        if mode == "offline":
            log.warning(
                "W&B: no API key (WANDB_API_KEY or `wandb login`) found: logging OFFLINE to %s/wandb; "
                "upload later with `wandb sync %s/wandb/offline-run-*`", save_dir, save_dir,
            )
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(
        project=project, entity=entity, name=name, group=group, tags=list(tags or []),
        mode=mode, save_dir=save_dir, log_model=False,
    )
    logger.adtrain_log_checkpoint = log_checkpoint
    return logger


WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")


def _check_modes(mode) -> None:
    """`logger.mode` and the WANDB_MODE environment variable (which W&B reads itself, and rejects
    with a pydantic traceback when it is set to anything else, even to nothing) checked up front."""
    from adtrain.errors import AdtrainError, ConfigError

    if mode != "auto" and mode not in WANDB_MODES:
        raise ConfigError("logger.mode", f"{mode!r} is not one of auto, {', '.join(WANDB_MODES)}")
    env = os.environ.get("WANDB_MODE")
    if env is not None and env not in WANDB_MODES:
        raise AdtrainError(
            f"environment variable WANDB_MODE={env!r} is not one of {', '.join(WANDB_MODES)}: "
            "unset it (`unset WANDB_MODE`) or set it to one of those"
        )


def default_name(cfg) -> str:
    """The W&B run name of a run whose logger.name is null: ``<method>-<data>-<category>-seed<seed>``
    (several categories joined by +; a continual run's schedule name), and ``-job<N>`` in a multirun, so that the jobs of a sweep over
    anything else (an Optuna study's trials) are told apart."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    parts = [str(cfg.method.name), str(cfg.data.name)]
    category = OmegaConf.select(cfg, "data.category", default=None)
    schedule = cfg.get("schedule")
    if schedule is not None and schedule.get("tasks"):  # a continual run: its schedule (results.json's category)
        category = schedule.get("name")
    if OmegaConf.is_list(category):
        category = "+".join(str(c) for c in category)
    if category not in (None, ""):
        parts.append(str(category))
    parts.append(f"seed{cfg.get('seed')}")
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        if hc.mode is not None and hc.mode.name == "MULTIRUN" and hc.job.get("num") is not None:
            parts.append(f"job{hc.job.num}")
    return "-".join(parts)


def default_group(cfg) -> str | None:
    """The W&B group of a run whose logger.group is null: the sweep directory in a multirun (every
    job of one sweep together), else `<schedule>-<method>-<data>` for a continual schedule, else none."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        hc = HydraConfig.get()
        if hc.mode is not None and hc.mode.name == "MULTIRUN":
            return str(hc.sweep.dir)[-128:]  # W&B groups hold at most 128 characters
    schedule = cfg.get("schedule")
    if schedule is not None and schedule.get("tasks"):
        return f"{schedule.name}-{cfg.method.name}-{cfg.data.name}"
    return None


def log_config(logger, cfg) -> None:
    """W&B: the resolved run config as the run's config (`hydra` left out: it is in .hydra/).
    Other loggers are left alone (the run directory has config.yaml already)."""
    from omegaconf import OmegaConf

    if not is_wandb(logger):
        return
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    logger.log_hyperparams(container)


@contextlib.contextmanager
def task_prefix(logger, t: int, n_tasks: int):
    """While task t of a continual run of several trains: its training and validation curves go to the
    logger as ``task<t>/<key>`` (``task1/val/image_auroc``). Each task's Trainer counts its steps from
    0, and W&B plots every key against ``trainer/global_step``: unprefixed, task 1's curves were drawn
    over task 0's. One task (or a joint fit) keeps the plain keys."""
    if logger is None or n_tasks < 2 or not hasattr(logger, "_prefix"):
        yield
        return
    before = logger._prefix, logger.__dict__.get("LOGGER_JOIN_CHAR")
    logger._prefix, logger.LOGGER_JOIN_CHAR = f"task{t}", "/"
    try:
        yield
    finally:
        logger._prefix = before[0]
        if before[1] is None:
            del logger.LOGGER_JOIN_CHAR
        else:
            logger.LOGGER_JOIN_CHAR = before[1]


def is_wandb(logger) -> bool:
    return type(logger).__name__ == "WandbLogger"


def score_table(records: list[dict]):
    """A W&B table of per-image records, one column per key any record has (blank where absent)."""
    import wandb

    cols = list(dict.fromkeys(c for r in records for c in r))
    return wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in records])


def _figure(v) -> bool:
    """A number to log as a metric: not a flag (pixel_metrics_exact), a name or a null."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def log_test_outputs(logger, results: dict, records: list[dict], heatmaps: list[str], checkpoint: Path | None,
                     tested: bool = True) -> None:
    """Scalars to any logger; heatmaps, a per-image score table and the checkpoint to W&B.
    A run without a test (test=false, a sweep's trial) logs its results as ``selected/*`` (the
    selected state's validation figures, threshold, times) and its checkpoint."""
    if logger is None:
        return
    prefix = "test" if tested else "selected"
    scalars = {f"{prefix}/{k}": v for k, v in results.items() if _figure(v)}
    for key, name in (("image_auroc_by_defect", "image_auroc"), ("test_at_threshold", "at_threshold"),
                      ("pixel_test_at_threshold", "pixel_at_threshold")):
        scalars.update({f"{prefix}/{name}/{k}": v for k, v in (results.get(key) or {}).items() if _figure(v)})
    for cat, figures in (results.get("by_category") or {}).items():  # test/by_category/<category>/<metric>
        scalars.update({f"{prefix}/by_category/{cat}/{k}": v for k, v in figures.items() if _figure(v)})
    auspro = results.get("auspro") or {}  # test/auspro/<category>/<defect type or mean>/<FPR limit>
    for cat, figures in (auspro.get("by_category") or {}).items():
        scalars.update({f"{prefix}/auspro/{cat}/{d}/{lim}": v for d, by in figures.items()
                        for lim, v in by.items() if _figure(v)})
    scalars.update({f"{prefix}/auspro/mean/{lim}": v for lim, v in (auspro.get("mean") or {}).items() if _figure(v)})
    logger.log_metrics(scalars)
    if is_wandb(logger):
        import wandb

        run = logger.experiment
        if heatmaps:
            run.log({"test/heatmaps": [wandb.Image(p, caption=Path(p).stem) for p in heatmaps]})
        if records:
            run.log({"test/scores": score_table(records)})
        if checkpoint is not None and getattr(logger, "adtrain_log_checkpoint", True):
            art = wandb.Artifact(name=f"model-{run.id}", type="model", metadata=scalars)
            art.add_file(str(checkpoint))
            run.log_artifact(art)
    logger.save()
