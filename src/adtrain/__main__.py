"""python -m adtrain [overrides]: one run or a multirun sweep (-m), composed by Hydra.

With no arguments at all it runs the offline quickstart (adtrain.api.QUICKSTART); --help says
what adtrain is, the groups a user sets and example commands (src/adtrain/conf/hydra/help/adtrain.yaml)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from adtrain.errors import AdtrainError, ConfigError, Terminated

log = logging.getLogger("adtrain")


def config_dir() -> str:
    """The package's configs (adtrain/conf, in the wheel too), or $ADTRAIN_CONFIG_DIR."""
    env = os.environ.get("ADTRAIN_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parent / "conf"
    if not (path / "config.yaml").exists():
        where = "ADTRAIN_CONFIG_DIR" if env else "the installed package (reinstall adtrain)"
        sys.exit(f"adtrain: error: no config.yaml in {path} ({where}); ADTRAIN_CONFIG_DIR names a config folder")
    return str(path)


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().mode.name == "MULTIRUN"
    except ValueError:
        return False


def _interrupted(run_dir: Path, signum: int = signal.SIGINT) -> None:
    """Ctrl-C or SIGTERM: where the run stands and the command that continues it (a sweep's job: the
    sweep's command); exit status 128 + the signal's number (130, 143), as a shell reports it, so that
    neither a run nor a sweep stopped part way reads as a success."""
    from adtrain import rundir
    from adtrain.resume import resume_command

    command = resume_command(run_dir)
    if _is_multirun():  # resuming the job's folder alone would never run the sweep's other jobs nor its summary
        from hydra.core.hydra_config import HydraConfig

        from adtrain.resume import sweep_resume_command

        command = sweep_resume_command(sys.argv[1:], HydraConfig.get().sweep.dir)
    how = "interrupted" if signum == signal.SIGINT else f"interrupted ({signal.Signals(signum).name})"
    if rundir.finished(run_dir):  # SIGTERM in a fit's or test's last batch: Lightning let the run finish
        rest = (f"; the sweep's unfinished jobs run on resume: {command}" if _is_multirun() else "")
        print(f"adtrain: {how}: the run in {run_dir} had finished: its results are kept{rest}", file=sys.stderr)
        sys.exit(128 + signum)
    ckpts = sorted(run_dir.glob("checkpoints/last.ckpt")) + sorted(run_dir.glob("tasks/*/checkpoints/last.ckpt"))
    if ckpts or (run_dir / "continual_state.json").exists() or (run_dir / "config.yaml").exists():
        where = (f"its last checkpoint is {ckpts[-1]}" if ckpts else "finished tasks are kept"
                 if (run_dir / "continual_state.json").exists() else "no epoch had finished (the fit starts over)")
        if _is_multirun():
            where += "; the sweep's finished jobs are kept and its unfinished ones run on resume"
        print(f"adtrain: {how}: the run in {run_dir} stopped; {where}. Resume it with: {command}",
              file=sys.stderr)
    elif _is_multirun():
        print(f"adtrain: {how} before the first checkpoint of the sweep's job in {run_dir}; the sweep's "
              f"finished jobs are kept and its unfinished ones run on resume: {command}", file=sys.stderr)
    else:
        print(f"adtrain: {how} before the first checkpoint of the run in {run_dir}: nothing to resume; "
              "run the same command again", file=sys.stderr)
    sys.exit(128 + signum)


def _between_jobs(run_dir: Path) -> None:
    """A sweep, once a job has returned: Ctrl-C or SIGTERM before the next job begins (Hydra's own
    work, the callbacks, the summary) says so with the sweep's resume command and exits 130 / 143.
    SIGTERM used to end the sweep without a word and Ctrl-C in a traceback from Hydra's callbacks."""
    import threading

    from hydra.core.hydra_config import HydraConfig

    if threading.current_thread() is not threading.main_thread() or not HydraConfig.initialized():
        return
    if not str(HydraConfig.get().launcher.get("_target_", "")).endswith(".BasicLauncher"):
        return  # joblib's or submitit's jobs run in processes of their own, which their launcher ends
    from adtrain.resume import sweep_resume_command

    command = sweep_resume_command(sys.argv[1:], HydraConfig.get().sweep.dir)
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:  # a forked process: it ends as it would without this handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        how = "interrupted" if signum == signal.SIGINT else f"interrupted ({signal.Signals(signum).name})"
        print(f"adtrain: {how} between the sweep's jobs (the last one ended in {run_dir}); its finished "
              f"jobs are kept and its unfinished ones run on resume: {command}", file=sys.stderr)
        sys.exit(128 + signum)

    handler.adtrain_between_jobs = True
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _sweeper_reads_objective() -> bool:
    """A single run, or a grid sweep, has no reader of the objective to warn about a missing one."""
    from hydra.core.hydra_config import HydraConfig

    from adtrain.sweep import reads_objective

    if not HydraConfig.initialized():  # no sweeper config to read: assume one that reads it
        return True
    target = str(HydraConfig.get().sweeper.get("_target_", "") or "")
    return reads_objective(OmegaConf.create({"hydra": {"sweeper": {"_target_": target}}}))


def _in_a_job() -> None:
    """A job begins: Ctrl-C is Python's KeyboardInterrupt again (the run says where it stopped)."""
    if getattr(signal.getsignal(signal.SIGINT), "adtrain_between_jobs", False):
        signal.signal(signal.SIGINT, signal.default_int_handler)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """The run; returns results[optimized_metric] (a validation figure) to a multirun's sweeper."""
    from adtrain import rundir
    from adtrain.io import write_text
    from adtrain.logs import quiet
    from adtrain.run import run, run_dir_from_hydra
    from adtrain.runstate import catch_sigterm, interrupted, sigterm_seen
    from adtrain.sweep import check_objective, objective

    quiet()
    run_dir = run_dir_from_hydra()
    if cfg.get("print_config", False):
        from adtrain.config_tree import print_config_tree

        print_config_tree(cfg)
    try:
        metric = check_objective(cfg.get("optimized_metric"))
    except AdtrainError as err:  # a wrong objective is the whole sweep's fault: stop it
        print(f"adtrain: error: {err}", file=sys.stderr)
        sys.exit(2)
    from hydra.core.hydra_config import HydraConfig

    mine = False
    _in_a_job()
    put_back = catch_sigterm(run_dir)  # SIGTERM stops the run as Ctrl-C does, with a word and a non-zero status
    try:
        from adtrain import distributed

        if HydraConfig.initialized() and distributed.rank() == 0:  # DDP ranks > 0: rank 0 holds the lock
            mine = rundir.acquire(run_dir)  # held already when RunDirGuard checked the directory
            if cfg.get("resume", False):
                from adtrain.resume import override_keys, resumed_config, sweep_job

                # the run's own config.yaml; only what was overridden on this command line may differ
                keys = override_keys(HydraConfig.get().overrides.task)
                if _is_multirun():  # a sweep run again: finished jobs kept, begun ones resumed, others run
                    done, cfg = sweep_job(cfg, run_dir, keys)
                    if done is not None:
                        log.info("%s finished in an earlier run of this sweep: its results are kept", run_dir)
                        return objective(done, metric)
                else:
                    cfg = resumed_config(cfg, run_dir, keys)
        results = run(cfg)
    except AdtrainError as err:
        log.error("%s", err)
        refused = isinstance(err, ConfigError) and err.key == "resume"  # the folder holds another job: left as it is
        if rundir.holds(run_dir) and not rundir.finished(run_dir) and not refused:  # never into another run's directory
            write_text(run_dir / "error.txt", f"{type(err).__name__}: {err}\n")
            fitted = run_dir / "checkpoints" / "model.ckpt"
            about_a_checkpoint = str(getattr(err, "path", None) or "").endswith(".ckpt")  # e.g. a resume's last.ckpt
            if fitted.is_file() and not about_a_checkpoint:  # it failed while testing: the fit is kept
                log.error("the fitted model is kept: %s; once the test data are fixed, "
                          "adtrain.test('%s', out_dir=...) tests it without fitting again", fitted, fitted)
        if _is_multirun():  # one failed job does not stop the sweep
            return None
        print(f"adtrain: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted(run_dir)
    except Terminated:  # SIGTERM (SLURM, timeout, Kubernetes): the run, and a sweep, stop (exit status 143)
        _interrupted(run_dir, signal.SIGTERM)
    except Exception as err:  # a crash (CUDA OOM, a library error): in a sweep, this job fails, the sweep goes on
        if sigterm_seen():  # SLURM signals every process of a job: a DataLoader worker's death is the SIGTERM's
            _interrupted(run_dir, signal.SIGTERM)
        if not _is_multirun():
            raise
        import traceback

        log.exception("job failed")
        if rundir.holds(run_dir) and not rundir.finished(run_dir):
            tail = "".join(traceback.format_exception(err)[-3:])
            write_text(run_dir / "error.txt", f"{type(err).__name__}: {err}\n{tail}")
        return None
    except SystemExit:
        if interrupted():  # Lightning ends a fit stopped by Ctrl-C with exit(1)
            _interrupted(run_dir)
        raise
    finally:
        put_back()
        if mine:
            rundir.release(run_dir)
        if _is_multirun():
            _between_jobs(run_dir)
    if sigterm_seen():  # it came in a last batch, which Lightning finishes: a sweep must not go on to its next job
        _interrupted(run_dir, signal.SIGTERM)
    return objective(results, metric, quiet=not _is_multirun() or not _sweeper_reads_objective())


def cli() -> None:
    """The `adtrain` command: no arguments = the quickstart, said in one line first."""
    if len(sys.argv) == 1:
        from adtrain.api import QUICKSTART

        print(f"adtrain: no arguments: running the offline quickstart (python -m adtrain {' '.join(QUICKSTART)}); "
              "python -m adtrain --help shows the options", file=sys.stderr)
        sys.argv += list(QUICKSTART)
    from adtrain.hydra_errors import one_line_composition_errors

    one_line_composition_errors()  # a misspelt key or group option: one line, exit status 2
    main()


if __name__ == "__main__":
    cli()
