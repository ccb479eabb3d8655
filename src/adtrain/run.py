"""One run in its own directory: checked, locked, fitted and tested (adtrain.engine), results written.

Everything lands in the run directory: results.json, config.yaml, checkpoints/ (best, last,
model.ckpt with the threshold), heatmaps/, scores.csv, score_histogram.png.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from lightning.pytorch import seed_everything
from omegaconf import DictConfig, OmegaConf, open_dict

from adtrain import distributed
from adtrain.build import build_datamodule, build_logger, build_method
from adtrain.data.image_cache import release_entries
from adtrain.engine import fit_and_test
from adtrain.errors import ConfigError
from adtrain.io import write_text
from adtrain.runstate import sigterm_as_error

log = logging.getLogger("adtrain")

#: what a run stopped by SIGTERM says to the Python API (the CLI prints its resume command instead)
RESUME_HINT = "the same config with resume=true, into this run directory, continues it"


def run_dir_from_hydra(default: str = ".") -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(default)


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    if not cfg.get("resume", False):
        return None
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.exists() and (run_dir / "config.yaml").exists():
        # stopped before its first epoch ended (e.g. while CFA/DFM validated their untrained start,
        # start.ckpt written): the fit restarts in the same directory, with the run's own config
        log.info("No %s yet (stopped before its first epoch ended): the fit starts over", last)
        return None
    if not last.exists():
        raise ConfigError(
            "resume",
            f"no checkpoint to resume from at {last}. Pass the interrupted run's directory: "
            "hydra.run.dir=<that run dir> resume=true",
        )
    log.info("Resuming from %s", last)
    return str(last)


def _record_resize_rule(cfg: DictConfig) -> DictConfig:
    """A data config without ``data.resize`` (a data yaml of one's own) runs with the default rule,
    written into the config so that config.yaml and the checkpoints say which rule the run used
    (a stored config without the key is read as an older run's, adtrain.data.resize.LEGACY)."""
    data = cfg.get("data")
    if not isinstance(data, DictConfig) or "_target_" not in data or "resize" in data:
        return cfg
    from adtrain.data.resize import DEFAULT

    cfg = copy.deepcopy(cfg)  # the caller's config stays as given
    with open_dict(cfg):
        cfg.data.resize = DEFAULT
    return cfg


def run(cfg: DictConfig, run_dir: Path | None = None) -> dict:
    """The whole run for `python -m adtrain`: a single task, or a continual schedule.

    The config is checked before anything is written; the run directory is locked for the run,
    refused if it holds an earlier run (unless resume=true or overwrite=true), and a resumed run
    takes its config from RUN/config.yaml (adtrain.resume)."""
    from adtrain import rundir
    from adtrain.preflight import check_config, check_flags
    from adtrain.resume import resumed_config

    run_dir = Path(run_dir) if run_dir is not None else run_dir_from_hydra()
    cfg = _record_resize_rule(cfg)
    if distributed.rank() != 0:  # a DDP rank started by rank 0: it computes, rank 0 owns the directory
        with sigterm_as_error(run_dir, RESUME_HINT):
            return _run_rank(cfg, run_dir)
    rundir.check_free(run_dir)  # a run still going is named as such, whatever it has written yet
    release_entries()  # a sequential sweep's earlier jobs' image cache entries are evictable again
    check_flags(cfg)  # overwrite=off must not read as true
    resume = bool(cfg.get("resume", False))
    if resume:
        cfg = resumed_config(cfg, run_dir)  # the run's own config; another experiment is refused
    else:
        rundir.refuse_earlier(run_dir, bool(cfg.get("overwrite", False)))  # before the lock file is made
    check_config(cfg)
    continual = cfg.get("schedule") is not None and bool(cfg.schedule.get("tasks"))
    with sigterm_as_error(run_dir, RESUME_HINT), rundir.locked(run_dir):
        if resume:
            cfg = resumed_config(cfg, run_dir)  # again, now that no other run can change the directory
        else:
            rundir.prepare_fresh(run_dir, bool(cfg.get("overwrite", False)), keep=rundir.hydra_keep(run_dir))
        rundir.check_outputs_writable(run_dir, "tasks" if continual else "checkpoints")
        if not resume:
            write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        if continual:
            from adtrain.continual.runner import run_schedule

            results = run_schedule(cfg, run_dir)
        else:
            results = _run_single(cfg, run_dir)
        rundir.succeeded(run_dir)
    from adtrain.report import show_run

    show_run(results, run_dir)  # the results table, naming the run directory
    return results


def _run_rank(cfg: DictConfig, run_dir: Path) -> dict:
    """A DDP rank > 0: the same computation as rank 0 (collectives pair up), no lock, no files."""
    log.setLevel(logging.WARNING)  # rank 0 tells the run; the others would repeat every line
    if bool(cfg.get("resume", False)):
        from adtrain.resume import resumed_config

        cfg = resumed_config(cfg, run_dir)
    if cfg.get("schedule") is not None and bool(cfg.schedule.get("tasks")):
        from adtrain.continual.runner import run_schedule

        return run_schedule(cfg, run_dir)
    return _run_single(cfg, run_dir)


def _run_single(cfg: DictConfig, run_dir: Path) -> dict:
    from adtrain.data.file_checks import check_files

    seed_everything(int(cfg.seed), workers=True, verbose=False)
    ckpt_path = resume_checkpoint(cfg, run_dir)
    dm = build_datamodule(cfg)
    check_files(dm, test=bool(cfg.get("test", True)))
    method = build_method(cfg)
    logger = build_logger(cfg, run_dir)
    ok = False
    try:
        results = fit_and_test(cfg, run_dir, dm, method, logger, ckpt_path)
        ok = True
    finally:
        if logger is not None and hasattr(logger, "experiment") and type(logger).__name__ == "WandbLogger":
            logger.experiment.finish(exit_code=0 if ok else 1)  # a failed job must not look finished on W&B
    return results
