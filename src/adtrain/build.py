"""Config -> objects, through Hydra `_target_` instantiation only, with clear errors."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from adtrain.errors import AdtrainError, ConfigError

#: keys of a method config that other groups read (the recipe), not constructor arguments
METHOD_RECIPE_KEYS = ("name", "max_epochs", "batch_size", "eval_batch_size", "image_size", "center_crop", "resize",
                      "selection", "start_confidence", "val_every_n_epochs", "nested_cache")


def _instantiate(node: DictConfig, where: str, /, drop: tuple[str, ...] = (), **kwargs):
    # a node of the whole config names its keys by their full path ("method.x"), a detached one relatively
    relative = [k[len(where) + 1:] if k.startswith(f"{where}.") else k for k in OmegaConf.missing_keys(node)]
    missing = sorted(f"{where}.{k}" for k in relative if k.split(".")[0] not in drop)
    if missing:
        raise ConfigError(missing[0], f"missing (???): set it on the command line, e.g. {missing[0]}=...")
    cfg = OmegaConf.to_container(node, resolve=True)
    for key in drop:
        cfg.pop(key, None)
    if not cfg.get("_target_"):
        raise ConfigError(f"{where}._target_", "missing: say which class builds this group")
    try:
        return hydra.utils.instantiate(cfg, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError) and cause.detail is not None:
            # a constructor names its own argument: say where it is set (coreset_ratio -> method.coreset_ratio,
            # data.image_size -> the method.image_size it is interpolated from)
            key = cause.key.removeprefix(f"{where}.")
            if _lookup(cfg, key)[0]:  # a top-level key, or a nested one (memory.nprobe, cutpaste.area_ratio)
                unresolved = OmegaConf.to_container(node, resolve=False)
                found, raw = _lookup(unresolved, key)
                source = _source_of(unresolved, key)
                raise ConfigError(source or f"{where}.{key}", cause.detail + (
                    f" ({where}.{key} is {raw})" if source and found else "")) from None
        if isinstance(cause, AdtrainError):
            raise cause from None
        if isinstance(cause, (TypeError, ValueError)) or type(cause).__name__ == "MisconfigurationException":
            # Lightning's own refusal of a callback's argument (EarlyStopping(mode="foo")) is one too
            raise ConfigError(_culprit(cfg, where, cause), f"{cause} (target {cfg['_target_']})") from None
        if "Error locating target" in str(err):  # a _target_ that does not import (e.g. in data.augment)
            text = str(err).splitlines()[0].split(", set env var")[0]
            target = text.split("'")[1] if text.count("'") >= 2 else None
            found = [k for k, v in cfg.items() if target and not k.startswith("_") and target in str(v)]
            raise ConfigError(f"{where}.{found[0]}" if len(found) == 1 else where, text) from None
        raise


def interpolated_from(raw) -> str | None:
    """The key a plain ``${other.key}`` interpolation (a config value, unresolved) takes its value from:
    where the user sets it (data.image_size is ${method.image_size}); None for anything else."""
    if isinstance(raw, str) and raw.startswith("${") and raw.endswith("}") and ":" not in raw and raw.count("${") == 1:
        return raw[2:-1]
    return None


def _lookup(cfg: dict, key: str) -> tuple[bool, object]:
    """(found, value) of ``key`` ("coreset_ratio", "memory.nprobe") in the plain config ``cfg``."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _source_of(raw_cfg: dict, key: str) -> str | None:
    """Where the user sets ``key`` of an unresolved config when it, or a node above it, is a plain
    interpolation: method.image_size for data's image_size (${method.image_size}), backbone.name for
    method's backbone.name (method.backbone is ${backbone}); None when it is set where it is."""
    node, parts = raw_cfg, key.split(".")
    for i, part in enumerate(parts):
        source = interpolated_from(node)
        if source is not None:
            return ".".join([source, *parts[i:]])
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return interpolated_from(node)


def _culprit(cfg: dict, where: str, cause: Exception) -> str:
    """The key a constructor's conversion error is about ("could not convert string to float: 'abc'" ->
    method.coreset_ratio, the one top-level value that is 'abc'), else the group."""
    import re

    found = re.search(r": '(.*)'$", str(cause))
    if found is None:
        return where
    keys = [k for k, v in cfg.items() if isinstance(v, str) and v == found.group(1) and not k.startswith("_")]
    return f"{where}.{keys[0]}" if len(keys) == 1 else where


def build_datamodule(cfg: DictConfig, **overrides):
    dm = _instantiate(cfg.data, "data", drop=("name",), **overrides)
    dm.setup()
    return dm


def build_method(cfg: DictConfig):
    method = _instantiate(cfg.method, "method", drop=METHOD_RECIPE_KEYS)
    return configure_method(method, cfg)


def configure_method(method, cfg: DictConfig):
    """The run-time settings outside method.* (inference.cpu_chunk_pixels, metrics.exact_pixels,
    metrics.aupro_fpr_limit, metrics.resolution) onto a built or loaded method; absent keys leave
    the defaults."""
    chunk = (cfg.get("inference") or {}).get("cpu_chunk_pixels")
    if chunk is not None:  # absent from the configs of runs older than the key: the default
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
            raise ConfigError("inference.cpu_chunk_pixels", f"must be an integer >= 0 (0 = whole batches), got {chunk!r}")
        method.cpu_chunk_pixels = chunk
    exact = (cfg.get("metrics") or {}).get("exact_pixels")
    if exact is not None:  # absent from the configs of runs older than the key: the default
        if isinstance(exact, bool) or not isinstance(exact, int) or exact < 0:
            raise ConfigError("metrics.exact_pixels", f"must be an integer >= 0 (0 = always stream), got {exact!r}")
        method.test_exact_pixels = exact
    limit = (cfg.get("metrics") or {}).get("aupro_fpr_limit")
    if limit is not None:  # absent from the configs of runs older than the key: the default
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 < limit <= 1:
            raise ConfigError("metrics.aupro_fpr_limit", f"must be a false-positive rate in (0, 1], got {limit!r}")
        method.aupro_fpr_limit = float(limit)
    resolution = (cfg.get("metrics") or {}).get("resolution")
    if resolution is not None:  # absent from the configs of runs older than the key: "run"
        from adtrain.metrics.source_resolution import RESOLUTIONS

        if resolution not in RESOLUTIONS:
            raise ConfigError("metrics.resolution", f"must be one of {', '.join(RESOLUTIONS)}, got {resolution!r}")
        method.pixel_resolution = str(resolution)
    return method


def build_logger(cfg: DictConfig, run_dir: Path):
    if cfg.get("logger") is None or not cfg.logger.get("_target_"):
        return None
    extra = {"save_dir": str(run_dir)} if cfg.logger.get("save_dir", None) is None else {}
    if not extra:  # made and writable now, not an OSError from inside the logger once the fit has begun
        from adtrain.io import writable_folder

        writable_folder(cfg.logger.save_dir, "logger.save_dir", "the logger's folder")
    if "group" in cfg.logger and cfg.logger.group is None:  # W&B: the sweep, else the continual schedule
        from adtrain.loggers import default_group

        extra["group"] = default_group(cfg)
    if "name" in cfg.logger and cfg.logger.name is None and "group" in cfg.logger:  # W&B: a name per job
        from adtrain.loggers import default_name

        extra["name"] = default_name(cfg)
    logger = _instantiate(cfg.logger, "logger", **extra)
    if cfg.get("resume", False):
        _keep_csv_rows(logger)
    from adtrain.loggers import log_config

    log_config(logger, cfg)
    return logger


def _keep_csv_rows(logger) -> None:
    """A resumed run appends to csv/metrics.csv: Lightning's CSVLogger would delete it on start."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    if not isinstance(logger, CSVLogger):
        return
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows, keys = list(reader), list(reader.fieldnames or [])
    writer = logger.experiment  # created now: this is where the old file is removed
    # the continual tasks whose after_task row the file holds: a resumed run logs the others' rows again (a
    # run killed between saving its state and logging a finished task's row has that task's row missing)
    logger.adtrain_logged_tasks = _after_task_rows(rows)
    writer.metrics_keys = sorted(set(writer.metrics_keys) | set(keys))
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=writer.metrics_keys)
        out.writeheader()
        out.writerows(rows)


def _after_task_rows(rows: list[dict]) -> set[int]:
    """The tasks t of the kept csv rows that hold a continual/after_task value (continual.outputs.log_row)."""
    tasks = set()
    for row in rows:
        try:
            tasks.add(int(float(row.get("continual/after_task"))))  # written as 0 or 0.0
        except (TypeError, ValueError, OverflowError):  # no after_task value: an epoch's row
            continue
    return tasks


def build_callbacks(cfg: DictConfig, extra=None) -> list:
    """The user's Lightning callbacks: each entry of `callbacks` (group callbacks/, a name -> a node
    with `_target_`; null entries dropped) and of `trainer.callbacks` (a list or such a mapping)."""
    out = []
    named = cfg.get("callbacks")
    named = {} if named is None else named
    if not isinstance(named, dict) and not OmegaConf.is_dict(named):
        raise ConfigError("callbacks", f"a mapping of name -> {{_target_: ...}} is expected, got {named!r}; "
                          "choose options with callbacks=[early_stopping,lr_monitor]")
    for name, node in named.items():
        if node is not None and not OmegaConf.is_dict(node):
            raise ConfigError(f"callbacks.{name}", f"{{_target_: ...}} expected, got {node!r}")
        if node is not None:
            out.append(_instantiate(node, f"callbacks.{name}"))
    if extra is None:
        return out
    items = list(extra.items()) if isinstance(extra, dict) else list(enumerate(extra)) if isinstance(extra, list) else None
    if items is None:
        raise ConfigError("trainer.callbacks", f"a list of {{_target_: ...}} is expected, got {extra!r}")
    for key, node in items:
        if node is None:
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"trainer.callbacks.{key}", f"{{_target_: ...}} expected, got {node!r}")
        out.append(_instantiate(OmegaConf.create(node), f"trainer.callbacks.{key}"))
    return out


def build_trainer(cfg: DictConfig, run_dir: Path, logger, selection=None, val_every: int = 1):
    """A Trainer writing last.ckpt (resume) each epoch; ``selection`` (adtrain.selection.Selection)
    keeps the selected state in best.ckpt."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from adtrain.checkpoint_io import AtomicCheckpointIO
    from adtrain.runstate import RunState

    ckpt = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="last", monitor=None, save_last=False, save_top_k=1,
        enable_version_counter=False,  # no monitor, top 1: the latest epoch, as last.ckpt
        save_on_train_epoch_end=True,  # every epoch, also those not validated (val_every_n_epochs > 1)
    )
    # RunState: RNG states and fit time travel in last.ckpt, so a resumed fit ends as an uninterrupted one
    callbacks = [ckpt, RunState(str(run_dir / "checkpoints" / "last.ckpt"))] + ([selection] if selection is not None else [])
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    callbacks += build_callbacks(cfg, kwargs.pop("callbacks", None))
    for key, value in kwargs.items():  # e.g. trainer.profiler={_target_: ...SimpleProfiler}
        if isinstance(value, dict) and value.get("_target_"):
            kwargs[key] = _instantiate(OmegaConf.create(value), f"trainer.{key}")
    if "strategy" in kwargs:
        from adtrain.strategy import resolve

        kwargs["strategy"] = resolve(kwargs["strategy"])  # ddp -> AdtrainDDPStrategy; spawn/fork refused
    max_epochs = kwargs.get("max_epochs")
    if val_every > 1 and kwargs.get("check_val_every_n_epoch") is None and max_epochs and max_epochs % val_every == 0:
        kwargs["check_val_every_n_epoch"] = int(val_every)  # skipped epochs do not even load the validation set
    try:
        trainer = Trainer(
            **kwargs, logger=logger if logger is not None else False, callbacks=callbacks,
            plugins=[AtomicCheckpointIO()], default_root_dir=str(run_dir),
        )
    except (TypeError, ValueError, ImportError, MisconfigurationException) as err:
        # an unknown accelerator, strategy or precision, devices=0, TPU without torch_xla, a progress bar
        # callback with enable_progress_bar=false: Lightning's message, naming the key it is about
        text = " ".join(str(err).split())
        raise ConfigError(_trainer_key(text, kwargs), text) from None
    return trainer, ckpt


def _trainer_key(text: str, kwargs: dict) -> str:
    """trainer.<key> for the first of the Trainer's arguments the error names, else trainer."""
    if "torch_xla" in text:
        return "trainer.accelerator"
    low = text.lower()
    for key in ("devices", "num_nodes", "precision", "strategy", "accelerator", "val_check_interval",
                "enable_progress_bar"):
        if key in kwargs and (key in low or key.replace("_", " ") in low):
            return f"trainer.{key}"
    return "trainer"
