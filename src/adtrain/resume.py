"""Resume = the run's own config (RUN/config.yaml), with only run-time settings allowed to change.

``python -m adtrain hydra.run.dir=RUN resume=true`` continues the run recorded in RUN, whatever the
default config is today. An override may change how the run executes (device, progress bar,
logger, outputs, loader workers) but not the experiment (data, method, backbone, recipe, seed,
schedule): that would mix two experiments into one result, and is refused with the differences.
"""

from __future__ import annotations

import copy
import logging
import re
import shlex
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from adtrain.errors import ConfigError

log = logging.getLogger("adtrain")

#: config keys (and everything under them) a resumed run may change
RESUMABLE = ("resume", "overwrite", "trainer.accelerator", "trainer.devices", "trainer.enable_progress_bar",
             "trainer.enable_model_summary", "trainer.log_every_n_steps", "logger", "output", "data.num_workers",
             "print_config", "paths",
             "data.cache", "data.cache_dir", "data.cache_max_gb", "data.device_normalize", "feature_cache", "feature_cache_max_gb",
             "feature_cache_dir", "coreset_cache_dir", "coreset_cache_max_gb", "method.nested_cache", "inference")
_ABSENT = "<absent>"


def resume_command(run_dir: str | Path) -> str:
    return f"python -m adtrain hydra.run.dir={shlex.quote(str(run_dir))} resume=true"


def sweep_resume_command(argv: list[str], sweep_dir: str | Path) -> str:
    """The sweep's own command line again, into its folder, with resume=true: finished jobs are kept, the
    stopped one resumes, the rest run and the summary is written (resuming one job's folder would not).
    The folder is quoted for Hydra (a comma would make it a sweep) and the whole line for the shell."""
    keep = [a for a in argv if not a.lstrip("+").startswith(("hydra.sweep.dir=", "resume="))]
    folder = str(sweep_dir)
    if re.search(r"[,()\[\]{}'\"\\=:$\s]", folder):  # characters Hydra's override grammar reads
        folder = "'" + folder.replace("\\", "\\\\").replace("'", "\\'") + "'"
    args = keep + [f"hydra.sweep.dir={folder}", "resume=true"]
    return "python -m adtrain " + " ".join(shlex.quote(a) for a in args)


def resumable(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in RESUMABLE)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b.c': leaf} of a nested dict (lists and empty dicts are leaves)."""
    if isinstance(node, dict) and node:
        out = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def override_keys(overrides) -> list[str]:
    """The config keys a list of Hydra overrides sets ('data=mvtec' -> 'data'; hydra.* left out)."""
    keys = []
    for item in list(overrides or []):
        key = str(item).split("=", 1)[0].lstrip("~+").split("@", 1)[0]
        if key and not key.startswith("hydra.") and key != "hydra":
            keys.append(key)
    return keys


def stored_config(run_dir: Path) -> dict:
    """RUN/config.yaml of a run that can be resumed (refused: none there, or the run finished)."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if (run_dir / "results.json").exists():
        raise ConfigError("resume", f"{run_dir} holds a finished run (results.json): nothing to resume; "
                          "overwrite=true runs it again from scratch")
    if not path.exists():
        last = run_dir / "checkpoints" / "last.ckpt"
        if last.exists():
            return _config_of_checkpoint(last)
        raise ConfigError("resume", f"no config.yaml in {run_dir}: nothing to resume. Pass the interrupted run's "
                          "directory: hydra.run.dir=<that run dir> resume=true")
    try:
        stored = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # noqa: BLE001 - any unreadable YAML
        raise ConfigError("resume", f"{path}: unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(stored, dict) or not {"method", "data"} <= set(stored):  # e.g. an empty file
        last = run_dir / "checkpoints" / "last.ckpt"
        if last.exists():  # the config last.ckpt carries, as for a deleted config.yaml
            log.warning("%s is not a run config (empty?): resuming with the config %s carries", path, last)
            return _config_of_checkpoint(last)
        raise ConfigError("resume", f"{path}: not a run config (empty, or no method/data); overwrite=true runs "
                          "the experiment again from the start")
    from adtrain.data.resize import with_legacy_rule

    return with_legacy_rule(stored)  # a run begun before data.resize existed: the rule it began with


def _config_of_checkpoint(last: Path) -> dict:
    """No config.yaml (deleted, or an older run): the config last.ckpt carries, read safely
    (weights only: a crafted file is refused here) and checked like any stored config."""
    from adtrain.loading import checked_config, read_checkpoint

    return checked_config(read_checkpoint(last).get("adtrain_config"), last)


def config_diff(stored: dict, new: dict, keys: list[str] | None = None) -> list[tuple[str, Any, Any]]:
    """(key, stored value, new value) for each leaf that differs; keys: only those under these."""
    a, b = flatten(stored), flatten(new)
    names = sorted(set(a) | set(b))
    if keys is not None:
        names = [n for n in names if any(n == k or n.startswith(k + ".") for k in keys)]
    return [(n, a.get(n, _ABSENT), b.get(n, _ABSENT)) for n in names if a.get(n, _ABSENT) != b.get(n, _ABSENT)]


def resumed_config(cfg: DictConfig, run_dir: Path, keys: list[str] | None = None,
                   stored: dict | None = None) -> DictConfig:
    """The config to resume run_dir with: its config.yaml, plus the run-time settings of cfg that
    differ (keys: only the overridden keys count, as on the command line; None: every key of cfg).
    Any other difference raises ConfigError('resume') listing it. stored: stored_config(run_dir),
    where the caller has read it already (it may come from last.ckpt)."""
    stored = stored_config(run_dir) if stored is None else stored
    new = OmegaConf.to_container(cfg, resolve=True)
    diffs = config_diff(stored, new, keys)
    refused = [d for d in diffs if not resumable(d[0])]
    if refused:
        raise ConfigError("resume", f"{run_dir} was run with another experiment: {_shown(refused)}. A resumed run may "
                          f"change only {', '.join(RESUMABLE[2:])}; resume with `{resume_command(run_dir)}` "
                          "or start a new run directory")
    merged = copy.deepcopy(stored)
    for prefix in RESUMABLE:  # each changed run-time setting is taken whole from cfg
        if any(k == prefix or k.startswith(prefix + ".") for k, _, _ in diffs):
            _put(merged, new, prefix.split("."))
    merged["resume"] = True
    return OmegaConf.create(merged)


#: where a sweep job's unreadable results.json is moved when the sweep is resumed (kept to be looked at)
DAMAGED_RESULTS = "results.damaged.json"


def sweep_job(cfg: DictConfig, run_dir: Path, keys: list[str] | None = None) -> tuple[dict | None, DictConfig]:
    """A job of a multirun sweep started again with resume=true: (results, cfg).

    Finished (results.json): its recorded results, if it ran this very job (the overridden keys
    equal, run-time settings aside; another job's folder is refused, as a resumed run is). Begun
    (config.yaml or last.ckpt): (None, its resumed config). Never begun (Hydra's .hydra/ alone, or
    an attempt that failed before its config was written): (None, cfg with resume=false), a fresh
    job. So a sweep that stopped part way is run again with its command plus resume=true. A finished
    job whose results.json cannot be read (a damaged copy) is begun: that file is moved aside
    (DAMAGED_RESULTS) and the job resumes, tested again from its fitted model."""
    import os

    from adtrain.api import results_or_why

    run_dir = Path(run_dir)
    results = run_dir / "results.json"
    if results.exists():
        path = run_dir / "config.yaml"
        try:
            stored = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        except Exception as err:  # noqa: BLE001 - any unreadable record
            stored = err
        if not isinstance(stored, dict):
            why = (f"{type(stored).__name__}: {' '.join(str(stored).split())}"  # a YAML error's lines, on one
                   if isinstance(stored, Exception) else "not a run config")
            raise ConfigError("resume", f"{path} of a finished job cannot be read ({why}), so whether the "
                              f"folder holds this very job is not known; move {run_dir} away and resume again "
                              "(that job alone runs again), or overwrite=true runs the whole sweep again")
        _another_job(run_dir, stored, cfg, keys)
        done, why = results_or_why(results)
        if done is not None:
            return done, cfg
        aside = run_dir / DAMAGED_RESULTS  # its fit is on disk: tested again from it, not refused
        os.replace(results, aside)
        log.warning("%s cannot be read (%s): moved to %s; the job resumes from its checkpoints", results, why,
                    aside.name)
    if (run_dir / "config.yaml").exists() or (run_dir / "checkpoints" / "last.ckpt").exists():
        stored = stored_config(run_dir)  # read once (without config.yaml: from last.ckpt)
        _another_job(run_dir, stored, cfg, keys)  # begun: refused as a finished job is
        return None, resumed_config(cfg, run_dir, keys, stored)
    fresh = copy.deepcopy(cfg)
    with open_dict(fresh):
        fresh["resume"] = False
    return None, fresh


def _another_job(run_dir: Path, stored: dict, cfg: DictConfig, keys: list[str] | None) -> None:
    """Refuse a sweep job's folder that holds another job (the overridden keys differ, run-time settings
    aside), its .hydra/ record put back as it was, with the sweep's way to resume (not a single run's)."""
    keys = None if keys is None else [*keys, *_recorded_keys(run_dir)]  # a key the new command dropped too
    refused = [d for d in config_diff(stored, OmegaConf.to_container(cfg, resolve=True), keys) if not resumable(d[0])]
    if refused:
        from adtrain.sweep_dir import restore_record

        restore_record(run_dir)  # Hydra has rewritten its .hydra/ for this job already
        raise ConfigError("resume", f"{run_dir} holds another job of a sweep ({_shown(refused)}): a sweep is resumed "
                          "with the command that began it plus resume=true (an Optuna sampler needs its "
                          "seed); overwrite=true runs the sweep again")


def _recorded_keys(run_dir: Path) -> list[str]:
    """The keys the job's own command overrode (its .hydra/ record as it was before this resumed sweep:
    adtrain.sweep_dir.PRIOR_RECORD): a resume whose command leaves one out would run its other jobs
    at the default while keeping this one's results, one summary of two configurations."""
    from adtrain.sweep_dir import PRIOR_RECORD

    record = Path(run_dir) / PRIOR_RECORD / "overrides.yaml"
    try:
        return override_keys(OmegaConf.load(record)) if record.is_file() else []
    except Exception:  # noqa: BLE001 - an unreadable record: the new command's keys alone, as before
        return []


def _shown(diffs: list[tuple[str, Any, Any]]) -> str:
    """'key: old -> new; ...' for the first six differences (and how many more)."""
    shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs[:6])
    return shown + (f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else "")


def _put(dst: dict, src: dict, path: list[str]) -> None:
    """dst[path] = src[path] (removed from dst where src has none)."""
    for part in path[:-1]:
        src = src.get(part) if isinstance(src, dict) else None
        if not isinstance(dst.get(part), dict):
            dst[part] = {}
        dst = dst[part]
    if isinstance(src, dict) and path[-1] in src:
        dst[path[-1]] = copy.deepcopy(src[path[-1]])
    else:
        dst.pop(path[-1], None)
