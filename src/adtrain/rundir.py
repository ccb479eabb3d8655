"""One run directory = one run: a lock while a run uses it, no silent reuse, no stale files.

- A run holds an exclusive lock (flock on ``RUN/.adtrain.lock``) for as long as it runs: a second
  run into the same directory stops at once, naming the directory and the holder's pid.
- A directory that holds a finished run (results.json) or a started one (checkpoints/, a
  continual state) is refused unless ``resume=true`` (continue it) or ``overwrite=true`` (its
  earlier outputs are deleted first).
- On success, a stale error.txt of an earlier attempt is removed.

``RunDirGuard`` (a Hydra callback, adtrain/conf/config.yaml) does these checks *before* Hydra writes
``.hydra/`` into the directory, and for ``resume=true`` keeps the run's original ``.hydra`` record
(Hydra is told not to write one: ``hydra.output_subdir=null`` for that job).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from adtrain.errors import AdtrainError, ConfigError

log = logging.getLogger("adtrain")

LOCK_FILE = ".adtrain.lock"
#: what shows that a run already trained in a directory (results.json: it finished)
STARTED_MARKERS = ("checkpoints/*.ckpt", "continual_state.json", "tasks/*")
_HELD: dict[str, int] = {}  # resolved run dir -> fd of its lock, for this process


def _key(run_dir: Path) -> str:
    return str(Path(run_dir).resolve())


def check_writable(path: str | os.PathLike, key: str = "hydra.run.dir") -> Path:
    """Create path (a folder) if needed and prove a file can be written in it; one-line error else."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".adtrain-write-test-{os.getpid()}"
        with open(probe, "w") as f:
            f.write("ok")
        probe.unlink()
    except OSError as err:
        why = {errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "read-only file system",
               errno.ENOTDIR: "a file is in the way (not a folder)", errno.EEXIST: "a file is in the way (not a folder)",
               errno.ENOSPC: "no space left"}.get(err.errno, err.strerror or type(err).__name__)
        raise ConfigError(key, f"cannot write into {path}: {why}") from None
    return path


#: seconds a lock left by a run that has ended (held by its exiting loader workers) is waited for
ORPHAN_WAIT_S = 15.0


def _alive(pid: str) -> bool:
    """Is ``pid`` (the lock file's text) a live process? Unknown text counts as alive."""
    from adtrain.io import process_alive

    try:
        return process_alive(int(pid))
    except ValueError:
        return True


def acquire(run_dir: str | os.PathLike, key: str = "hydra.run.dir", what: str = "run") -> bool:
    """Take the run directory's lock for this process (True), or find it already held here (False).
    Another process holding it: ConfigError naming the directory, at once (no waiting). A sweep
    holds its folder the same way (key hydra.sweep.dir, what "sweep": adtrain.sweep_dir)."""
    run_dir = check_writable(run_dir, key)
    held = _key(run_dir)
    if held in _HELD:
        return False
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    deadline = time.monotonic() + ORPHAN_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            # a killed run's DataLoader workers inherit its lock (flock follows the descriptor) and
            # hold it for the seconds they take to exit: wait for them, not for a live run
            if not _alive(holder) and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            os.close(fd)
            raise _in_use(run_dir, holder, key, what) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD[held] = fd
    from adtrain.io import remove_dead_temps

    if gone := remove_dead_temps(run_dir):  # a write killed midway (a checkpoint's temp is its size)
        log.info("%s: %d temp file(s) of an ended run's unfinished writes deleted",
                                          run_dir, gone)
    return True


def _in_use(run_dir: Path, holder: str, key: str = "hydra.run.dir", what: str = "run") -> ConfigError:
    gone = "" if _alive(holder) else ", which has ended: its worker processes still hold the lock"
    return ConfigError(key, f"{run_dir} is in use by another {what} (pid {holder}{gone}); wait "
                       f"for it to end or choose another {key}")


def check_free(run_dir: str | os.PathLike) -> None:
    """The in-use error where a live run holds run_dir's lock, before anything else is said about the
    directory (a run still going is not "an earlier run that did not finish"); creates nothing. A lock
    held only by a dead run's exiting workers passes here: acquire waits for them."""
    run_dir = Path(run_dir)
    if _key(run_dir) in _HELD:
        return
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return  # no lock file: no run has held this directory
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            if _alive(holder):
                raise _in_use(run_dir, holder) from None
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def holds(run_dir: str | os.PathLike) -> bool:
    """Does this process hold run_dir's lock?"""
    return _key(Path(run_dir)) in _HELD


def release(run_dir: str | os.PathLike) -> None:
    fd = _HELD.pop(_key(run_dir), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def locked(run_dir: str | os.PathLike):
    """Hold the run directory's lock for the block (a no-op if this process already holds it)."""
    mine = acquire(run_dir)
    try:
        yield Path(run_dir)
    finally:
        if mine:
            release(run_dir)


def finished(run_dir: Path) -> bool:
    return (Path(run_dir) / "results.json").exists()


def started(run_dir: Path) -> bool:
    return finished(run_dir) or any(any(Path(run_dir).glob(m)) for m in STARTED_MARKERS)


def is_run_dir(path: Path) -> bool:
    """Does path hold a run: made by one (config.yaml, or Hydra's .hydra/) and holding its results,
    checkpoints or continual state? Its scores.csv and heatmaps/ are that run's test's, so predict's
    out= and test's out_dir may not be it (a folder that merely holds a checkpoints/ folder may)."""
    path = Path(path)
    made = (path / "config.yaml").is_file() or (path / ".hydra").is_dir()
    return made and (started(path) or (path / "checkpoints").is_dir())


def check_outputs_writable(run_dir: Path, sub: str) -> None:
    """run_dir/sub (checkpoints/, tasks/) can be written, checked without leaving a folder behind
    (acquire already proved run_dir itself writable)."""
    path = Path(run_dir) / sub
    if os.path.lexists(path):
        check_writable(path)


def clear(run_dir: Path, keep: tuple[str, ...] = ()) -> None:
    """Delete everything in run_dir but the lock file and the names in keep.

    In the order that leaves a directory cut short by a kill in a state it can be read in: results.json
    first (a half-deleted run must not look finished: Run.open would read it, adtrain.test would miss its
    model.ckpt), what shows a run started (STARTED_MARKERS) last, so that anything left still reads as an
    unfinished run, refused until overwrite=true clears it, never taken over by a new run unseen."""
    run_dir = Path(run_dir)
    (run_dir / "results.json").unlink(missing_ok=True)
    markers = {m.split("/")[0] for m in STARTED_MARKERS}  # checkpoints, continual_state.json, tasks
    rest = [p for p in run_dir.iterdir() if p.name not in (LOCK_FILE, *keep)]
    for p in sorted(rest, key=lambda p: p.name in markers):  # False (not a marker) first
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def refuse_earlier(run_dir: Path, overwrite: bool) -> None:
    """A new run (not resume) may not go into an earlier run's directory unless overwrite=true, nor clear
    one that holds other runs."""
    run_dir = Path(run_dir)
    if not started(run_dir):
        return
    if not overwrite:
        what = ("a finished run (results.json)" if finished(run_dir)
                else "an earlier run that did not finish (resume=true continues it)")
        raise ConfigError("overwrite", f"{run_dir} holds {what}; overwrite=true replaces it, or choose another "
                          "hydra.run.dir")
    refuse_nested(run_dir)


def nested_runs(run_dir: Path) -> list[Path]:
    """Other runs or sweeps inside run_dir (hydra.run.dir=outputs/a, then outputs/a/b): folders below
    it that hold a run of their own (is_run_dir) or a sweep's multirun.yaml. The run's own checkpoints/,
    tasks/ and Hydra record are not searched."""
    run_dir = Path(run_dir)
    own = {"checkpoints", "tasks", ".hydra"}
    found = []
    for top in sorted(p for p in run_dir.iterdir() if p.name not in own and p.is_dir() and not p.is_symlink()):
        for here, dirs, files in os.walk(top):
            if "multirun.yaml" in files or is_run_dir(Path(here)):
                found.append(Path(here))
                dirs.clear()  # its own folders are its business
    return found


def refuse_nested(run_dir: Path) -> None:
    """overwrite=true clears one run's directory, never another run kept inside it."""
    nested = nested_runs(run_dir)
    if nested:
        raise ConfigError("overwrite", f"overwrite=true would clear {run_dir}, but it also holds {len(nested)} other "
                          f"run(s) or sweep(s) (e.g. {nested[0]}); nothing was deleted: move them out of it first, "
                          "or choose another hydra.run.dir")


def prepare_fresh(run_dir: Path, overwrite: bool, keep: tuple[str, ...] = ()) -> None:
    """A new run (not resume) in run_dir: refuse an earlier run's directory unless overwrite, which
    clears it first. Call with the lock held."""
    run_dir = Path(run_dir)
    refuse_earlier(run_dir, overwrite)
    if started(run_dir):
        clear(run_dir, keep)
    else:
        (run_dir / "error.txt").unlink(missing_ok=True)  # an attempt that failed before training


def succeeded(run_dir: Path) -> None:
    """The run finished: no error.txt of an earlier attempt stays beside its results."""
    (Path(run_dir) / "error.txt").unlink(missing_ok=True)


def hydra_keep(run_dir: Path) -> tuple[str, ...]:
    """Files Hydra already wrote into run_dir for this very job (kept when clearing)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ()
    hc = HydraConfig.get()
    if _key(Path(hc.runtime.output_dir)) != _key(run_dir):
        return ()
    return tuple(n for n in (hc.output_subdir, f"{hc.job.name}.log") if n)


def fail(err: AdtrainError) -> None:
    print(f"adtrain: error: {err}", file=sys.stderr)
    sys.exit(2)


class RunDirGuard(Callback):
    """Hydra callback: lock, check and (overwrite=true) clear the run directory before Hydra writes
    anything into it; with resume=true, check the overrides against RUN/config.yaml and keep the
    original .hydra record. The lock is held until the process ends."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from adtrain.preflight import check_config, check_flags
        from adtrain.resume import override_keys, resumed_config

        from adtrain import distributed

        if distributed.rank() != 0:  # a DDP rank started by rank 0, which holds the lock and checked it all
            return
        run_dir = Path(str(config.hydra.run.dir))
        with read_write(config.hydra):
            config.hydra.run.dir = str(run_dir)  # resolved once: ${now:...} must not move between here and Hydra
        try:
            check_free(run_dir)  # a run still going is named as such, whatever it has written yet
            task = _task_config(config)
            check_flags(task)  # overwrite=off must not read as true
            resume = bool(task.get("resume", False))
            if resume:
                check_config(resumed_config(task, run_dir, override_keys(config.hydra.overrides.task)))
            else:
                check_config(task)
                refuse_earlier(run_dir, bool(task.get("overwrite", False)))  # before the lock file is made
            acquire(run_dir)
            if resume:
                resumed_config(task, run_dir, override_keys(config.hydra.overrides.task))  # again, under the lock
                with read_write(config.hydra), open_dict(config.hydra):
                    config.hydra.output_subdir = None  # the run's own .hydra/ stays as it was
            else:
                prepare_fresh(run_dir, bool(task.get("overwrite", False)))
        except AdtrainError as err:
            fail(err)


def _task_config(config: DictConfig) -> DictConfig:
    """The job's config without the hydra node (what the task function will get)."""
    import copy

    task = copy.deepcopy(config)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task
