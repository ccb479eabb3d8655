"""A sweep's folder before its first job: an earlier sweep's jobs there are refused, kept
(resume=true, their Hydra records copied aside until the sweep ends) or deleted (overwrite=true),
never a single run's or another sweep's kept inside it."""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from adtrain.errors import ConfigError

log = logging.getLogger("adtrain")

def lock_sweep_dir(sweep_dir: Path) -> None:
    """Take sweep_dir for this sweep's process until it ends (a run directory's lock: freed when the
    process ends, however it ends), or refuse naming the sweep that holds it. Two sweeps in one
    folder (a named one given twice, or the default, named by the second a sweep starts, for sweeps
    started together) mixed their jobs: each found the other's job folders, whose Hydra records it
    had just rewritten, and both summaries read one sweep's results under the other's overrides."""
    from adtrain import rundir

    try:
        rundir.acquire(sweep_dir, "hydra.sweep.dir", "sweep")
    except ConfigError as err:
        if "in use by another sweep" not in str(err.detail):  # e.g. a folder that cannot be written
            raise
        raise ConfigError("hydra.sweep.dir", f"{err.detail} (the default folder is named by the second a sweep "
                          "starts, so sweeps started together share it: give each its own, "
                          "hydra.sweep.dir=multirun/<name>)") from None


def unlock_sweep_dir(sweep_dir: Path) -> None:
    from adtrain import rundir

    rundir.release(sweep_dir)


def check_sampler_repeats(config: DictConfig) -> None:
    """A resumed Optuna sweep needs a seeded sampler: an unseeded one proposes other trials than the
    stopped sweep's, and every job would then find another job's folder (refused one by one)."""
    sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
    if "optuna" in sweeper.lower() and OmegaConf.select(config, "hydra.sweeper.sampler.seed", default=None) is None:
        raise ConfigError("hydra.sweeper.sampler.seed", "resume=true repeats the stopped sweep's trials only with "
                          "the seed its sampler began with; an unseeded sweep cannot be resumed (overwrite=true "
                          "runs it again)")


#: a copy of each earlier job's .hydra/ while a sweep is resumed: Hydra rewrites a job's .hydra/
#: before the job can look, so a job found to be another sweep's (adtrain.resume.sweep_job) puts it back
PRIOR_RECORD = ".hydra-before-resume"


def keep_records(jobs: list[Path]) -> None:
    for job in jobs:
        prior = job / PRIOR_RECORD
        if prior.exists():
            shutil.rmtree(prior)
        shutil.copytree(job / ".hydra", prior)


def restore_record(job: Path) -> None:
    """The job's .hydra/ as it was before this resumed sweep began (no copy: left as it is)."""
    prior = Path(job) / PRIOR_RECORD
    if prior.is_dir():
        shutil.rmtree(Path(job) / ".hydra", ignore_errors=True)
        shutil.copytree(prior, Path(job) / ".hydra")


def drop_records(sweep_dir: Path) -> None:
    for prior in Path(sweep_dir).glob(f"**/{PRIOR_RECORD}"):
        shutil.rmtree(prior, ignore_errors=True)


#: what a sweep writes beside its jobs (adtrain's summary, Optuna's best trial): an earlier sweep's
#: would describe that sweep until this one ends
SWEEP_OUTPUTS = ("summary.csv", "summary.md", "optimization_results.yaml")


def job_folders(sweep_dir: Path) -> list[Path]:
    """The folders under sweep_dir that collect() reads as jobs: a .hydra/ record or an error.txt
    (at any depth: hydra.sweep.subdir may nest them)."""
    found = {p.parent for p in sweep_dir.glob("**/.hydra") if p.is_dir()}
    found |= {p.parent for p in sweep_dir.glob("**/error.txt")}
    return sorted(found)


def single_runs(folders: list[Path]) -> list[Path]:
    """The folders among these that Hydra's record says a single run made (hydra.mode: RUN), not a
    sweep's job (MULTIRUN); a folder without a readable record is not counted."""
    found = []
    for folder in folders:
        try:
            mode = OmegaConf.select(OmegaConf.load(Path(folder) / ".hydra" / "hydra.yaml"), "hydra.mode")
        except Exception:  # noqa: BLE001 - no record, or an unreadable one: not known to be a single run
            continue
        if str(mode) == "RUN":
            found.append(Path(folder))
    return found


def _flag(config: DictConfig, key: str) -> bool:
    """A true/false key read before any job checks it (preflight.check_flags): overwrite=off, a
    string Python reads as true, must not delete an earlier sweep's jobs."""
    value = config.get(key, False)
    if value is not None and not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {value!r}")
    return bool(value)


def clear_earlier(sweep_dir: Path, jobs: list[Path]) -> None:
    """overwrite=true: delete an earlier sweep's jobs and outputs before this sweep's first job. A job
    this sweep does not run again (fewer or other jobs, another subdir) would otherwise be summarised
    as one of its own. Each job's lock is taken first, all of them before any folder goes: a run still
    going in one stops the sweep with nothing deleted."""
    from adtrain import rundir

    with contextlib.ExitStack() as held:
        for job in jobs:
            try:
                rundir.check_free(job)
            except ConfigError:
                raise ConfigError("hydra.sweep.dir", f"overwrite=true would delete the earlier sweep's job {job}, "
                                  f"but a run still going holds it (pid {_lock_holder(job)}); nothing was deleted: "
                                  "wait for it to end, or choose another hydra.sweep.dir") from None
            held.enter_context(rundir.locked(job))  # no run starts in it while the folders go
        try:
            for job in jobs:
                if job.resolve() == sweep_dir.resolve():  # hydra.sweep.subdir='': jobs share the folder itself
                    rundir.clear(job)
                elif job.is_dir():  # not gone with a job folder above it
                    shutil.rmtree(job)
                    _prune_empty(job.parent, sweep_dir)
            for name in SWEEP_OUTPUTS:
                (sweep_dir / name).unlink(missing_ok=True)
        except OSError as err:  # raised from a Hydra callback it would be a warning, the sweep going on
            raise ConfigError("hydra.sweep.dir", f"overwrite=true cannot delete {err.filename or sweep_dir} of an "
                              f"earlier sweep: {err.strerror or err}") from None
    if jobs:
        log.info("overwrite=true: %d job folder(s) of an earlier sweep deleted from %s", len(jobs), sweep_dir)


def _lock_holder(job: Path) -> str:
    from adtrain.rundir import LOCK_FILE

    try:
        return (job / LOCK_FILE).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _prune_empty(folder: Path, sweep_dir: Path) -> None:
    """Remove the folders a deleted nested job leaves empty (texture/ of texture/seed0), up to sweep_dir."""
    stop = sweep_dir.resolve()
    while folder.resolve() != stop and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def prepare_sweep_dir(config: DictConfig) -> None:
    """An earlier sweep's jobs in hydra.sweep.dir would be summarised under this sweep's overrides
    (Hydra rewrites each job's .hydra/ before the job refuses the folder): refused, unless resume=true
    (kept, their records copied) or overwrite=true (deleted now; resume wins, as for one run)."""
    where = OmegaConf.select(config, "hydra.sweep.dir")
    sweep_dir = Path(str(where)) if where else None
    earlier = sorted(p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")) if sweep_dir else []
    overwrite, resume = _flag(config, "overwrite"), _flag(config, "resume")
    # a folder of runs used as the sweep's (hydra.sweep.dir=outputs); resume=true may meet one job run again alone
    single = single_runs(job_folders(sweep_dir)) if earlier and not resume else []
    singles = (f"{len(single)} single run(s) (e.g. {single[0]}: its .hydra/hydra.yaml says hydra.mode RUN)"
               if single else "")
    # another sweep kept inside this one's folder (its own multirun.yaml below it): its jobs are not this folder's
    inner = sorted(p.parent for p in sweep_dir.glob("*/**/multirun.yaml")) if earlier and overwrite and not resume \
        else []
    if (single or inner) and overwrite:
        held = singles or f"another sweep's folder ({inner[0]}: its own multirun.yaml)"
        raise ConfigError("hydra.sweep.dir", f"overwrite=true deletes an earlier sweep's jobs, but {sweep_dir} also "
                          f"holds {held}; nothing was deleted: move them out of it first, or choose another "
                          "hydra.sweep.dir")
    if earlier and not (overwrite or resume):
        raise ConfigError("hydra.sweep.dir", f"{sweep_dir} holds {len(earlier)} job(s) of an earlier sweep"
                          + (f", {singles} among them: choose another hydra.sweep.dir" if single else
                             "; choose another hydra.sweep.dir, or overwrite=true / resume=true"))
    if earlier and resume and not overwrite:
        check_sampler_repeats(config)
        keep_records(earlier)  # a job that turns out to be another sweep's gets its record back
    if overwrite and not resume and sweep_dir is not None and sweep_dir.is_dir():
        clear_earlier(sweep_dir, job_folders(sweep_dir))
