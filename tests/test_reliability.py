"""Fault injection (issue 11): runs that cannot be mixed up or lost, resume that continues the same
experiment, the same seed giving the same result, bad input failing before training in one line,
and predict writing only what describes its own call. docs/RELIABILITY.md lists what each holds."""

import csv
import fcntl
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image

from adtrain.errors import ConfigError, DataError
from tests.conftest import FAST, TEST_THREADS

# small enough for seconds per epoch, large enough that an epoch outlasts the kill below
KILL_FAST = [*FAST, "data.size=64", "trainer.max_epochs=4", "logger=csv", "output.heatmaps=0"]
# training-time randomness in the workers (the fast runs have none by default)
AUGMENT = "data.augment=[{_target_:albumentations.HorizontalFlip,p:0.5},{_target_:albumentations.RandomBrightnessContrast,p:0.5}]"
TINY_SCHEDULE = [*FAST, "data.num_train=16", "data.num_test_normal=3", "data.num_test_anomalous=3", "data.size=32",
                 "method.image_size=[32,32]", "method.batch_size=4", "output.heatmaps=0",
                 "schedule.tasks=[texture,grid]"]
COMPARED = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro",
            "val_image_auroc", "val_pixel_auroc", "val_normal_score", "threshold")


# ---------------------------------------------------------------------------------------- helpers
def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS=TEST_THREADS)


def _cli(*args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "adtrain", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _start(*args, cwd, log, group=False):
    """group: the run leads a process group of its own (its loader workers in it), as a SLURM job step."""
    out = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "adtrain", *args], cwd=cwd, env=_env(), stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=group)


def _resume_beside_reference(run_dir, ref, over, cwd, log):
    """The CLI's resume of a killed run (nothing but resume=true: the run's own config), and meanwhile, in
    this process (adtrain.run.run, what the CLI runs), the uninterrupted run it must equal: on 2 cores each
    leaves the other room, and the reference costs no Python and torch start-up of its own."""
    from adtrain.run import run
    from tests.conftest import compose

    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "adtrain", f"hydra.run.dir={run_dir}", "resume=true"],
                                cwd=cwd, env=_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            run(compose(*over), ref)
            rc = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert rc == 0, Path(log).read_text()[-3000:]


def _signal_when(proc, ready, sig, timeout=400, group=False):
    """Send sig to proc (group: to its whole process group) as soon as ready() holds; fail if proc ends first."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if ready():
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
            return proc.wait(timeout=120)
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before it could be interrupted")
        time.sleep(0.01)
    proc.kill()
    pytest.fail("timed out waiting for the run's first checkpoint")


def _metrics(path):
    res = json.loads(Path(path).read_text())
    return {k: res.get(k) for k in COMPARED}


def _one_line_error(stderr: str, *needles: str) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("adtrain: error:")]
    assert len(errors) == 1, stderr[-3000:]
    for n in needles:
        assert n in errors[0], errors[0]


def _never_trains(monkeypatch):
    from adtrain.methods.stfpm import Stfpm

    def step(self, batch, idx):
        raise AssertionError("training started before the bad input was found")

    monkeypatch.setattr(Stfpm, "training_step", step)


def _crash_at_epoch(monkeypatch, epoch=1, error=None):
    from adtrain.methods.stfpm import Stfpm

    original = getattr(Stfpm.training_step, "unpatched", Stfpm.training_step)

    def step(self, batch, idx):
        if self.current_epoch == epoch:
            raise error if error is not None else RuntimeError("simulated crash")
        return original(self, batch, idx)

    step.unpatched = original
    monkeypatch.setattr(Stfpm, "training_step", step)
    return original


# ---------------------------------------------------------------------------------------- run directories
def test_two_concurrent_runs_into_one_directory_one_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    procs = [_start(*FAST, f"seed={s}", f"hydra.run.dir={run_dir}", cwd=tmp_path, log=tmp_path / f"{s}.log")
             for s in (0, 1)]
    rcs = [p.wait(timeout=600) for p in procs]
    logs = [(tmp_path / f"{s}.log").read_text() for s in (0, 1)]
    assert sorted(rcs) == [0, 2], logs
    loser = logs[rcs.index(2)]
    assert str(run_dir) in loser and ("in use by another run" in loser or "finished run" in loser), loser
    assert "Traceback" not in loser
    winner_seed = rcs.index(0)
    # every file describes the one run that finished
    assert json.loads((run_dir / "results.json").read_text())["seed"] == winner_seed
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed"] == winner_seed
    assert yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["seed"] == winner_seed
    assert not (run_dir / "error.txt").exists()


def test_a_locked_directory_is_refused_at_once(fast_cfg, tmp_path, monkeypatch):
    from adtrain.run import run

    _never_trains(monkeypatch)
    live = os.getpid()  # a live process's pid: a run that is still going
    tmp_path.joinpath(".adtrain.lock").write_text(str(live))
    with open(tmp_path / ".adtrain.lock", "r+") as held:  # another "run" holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        t0 = time.perf_counter()
        with pytest.raises(ConfigError, match=rf"{tmp_path}.*in use by another run \(pid {live}\)"):
            run(fast_cfg(), tmp_path)
        assert time.perf_counter() - t0 < 5
    assert not (tmp_path / "config.yaml").exists()


@pytest.mark.parametrize("how", ["api", "cli", "cli_resume"])
def test_a_run_still_going_is_named_as_such_once_it_has_checkpoints(fast_cfg, tmp_path, monkeypatch, capsys, how):
    """A live run that has written checkpoints is "in use by another run (pid N)", not "an earlier run
    that did not finish (resume=true continues it)": that advice, taken, would resume a run that is
    still going."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from adtrain.rundir import RunDirGuard
    from adtrain.run import run
    from tests.conftest import CONF

    _never_trains(monkeypatch)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"written by the live run")
    live = os.getpid()
    tmp_path.joinpath(".adtrain.lock").write_text(str(live))
    with open(tmp_path / ".adtrain.lock", "r+") as held:  # the live run holds its lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if how == "api":
            with pytest.raises(ConfigError, match=rf"{tmp_path} is in use by another run \(pid {live}\)"):
                run(fast_cfg(), tmp_path)
        else:
            over = [*FAST, f"hydra.run.dir={tmp_path}", *(["resume=true"] if how == "cli_resume" else [])]
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                config = hydra_compose("config", overrides=over, return_hydra_config=True)
            with pytest.raises(SystemExit) as e:
                RunDirGuard().on_run_start(config)
            assert e.value.code == 2
            err = capsys.readouterr().err
            assert f"{tmp_path} is in use by another run (pid {live})" in err and "resume=true" not in err, err
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == b"written by the live run"
    assert not (tmp_path / "config.yaml").exists()
    run_free = tmp_path / "free"  # a lock file nobody holds (a run that ended) says nothing
    run_free.mkdir()
    (run_free / ".adtrain.lock").write_text(str(live))
    from adtrain.rundir import check_free

    check_free(run_free)


def test_a_lock_left_by_a_killed_runs_workers_is_waited_for(tmp_path, monkeypatch):
    """kill -9 of a run: its DataLoader workers inherit the lock (flock follows the descriptor) and
    hold it for the seconds they take to exit. The holder's pid is dead: acquire waits for them
    (and says so if they outlast the wait) instead of calling it another run."""
    import threading

    from adtrain import rundir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (tmp_path / rundir.LOCK_FILE).write_text(dead)
    held = open(tmp_path / rundir.LOCK_FILE, "r+")
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the "orphaned worker"
    threading.Timer(1.0, held.close).start()  # it exits a second later
    t0 = time.perf_counter()
    assert rundir.acquire(tmp_path)
    assert 0.8 < time.perf_counter() - t0 < 10
    rundir.release(tmp_path)
    monkeypatch.setattr(rundir, "ORPHAN_WAIT_S", 0.5)
    (tmp_path / rundir.LOCK_FILE).write_text(dead)
    with open(tmp_path / rundir.LOCK_FILE, "r+") as still:
        fcntl.flock(still, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match=rf"pid {dead}, which has ended"):
            rundir.acquire(tmp_path)


def test_finished_run_is_refused_then_overwrite_clears_it(fast_cfg, tmp_path):
    from adtrain.run import run

    run(fast_cfg("trainer.limit_train_batches=1"), tmp_path)
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(ConfigError, match=rf"overwrite.*{tmp_path} holds a finished run"):
        run(fast_cfg("trainer.limit_train_batches=1", "seed=1"), tmp_path)
    assert (tmp_path / "results.json").read_text() == before  # untouched
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["seed"] == 0

    (tmp_path / "heatmaps" / "stale_from_old_run.png").write_bytes(b"x")
    (tmp_path / "error.txt").write_text("ConfigError: an old failure\n")
    res = run(fast_cfg("trainer.limit_train_batches=1", "seed=1", "overwrite=true"), tmp_path)
    assert res["seed"] == 1 and json.loads((tmp_path / "results.json").read_text())["seed"] == 1
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["seed"] == 1
    assert not (tmp_path / "heatmaps" / "stale_from_old_run.png").exists()
    assert not (tmp_path / "error.txt").exists()


def test_an_interrupted_run_is_not_silently_restarted(fast_cfg, tmp_path, monkeypatch):
    from adtrain.run import run

    _crash_at_epoch(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(fast_cfg("trainer.max_epochs=2", "trainer.limit_train_batches=1"), tmp_path)
    with pytest.raises(ConfigError, match="did not finish.*resume=true"):
        run(fast_cfg("trainer.max_epochs=2", "trainer.limit_train_batches=1"), tmp_path)


def test_a_run_stopped_before_its_first_epoch_ended_resumes_from_the_start(fast_cfg, tmp_path, monkeypatch):
    """No last.ckpt yet (stopped in the first epoch, e.g. while CFA/DFM validated their untrained
    start): resume=true starts the fit over in the same directory and ends as an uninterrupted run."""
    from adtrain.run import run

    over = ["trainer.max_epochs=2", "trainer.limit_train_batches=1"]
    _crash_at_epoch(monkeypatch, epoch=0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(fast_cfg(*over), tmp_path / "a")
    assert not (tmp_path / "a" / "checkpoints" / "last.ckpt").exists()
    monkeypatch.undo()
    resumed = run(fast_cfg(*over, "resume=true"), tmp_path / "a")
    fresh = run(fast_cfg(*over), tmp_path / "b")
    assert resumed["image_auroc"] == fresh["image_auroc"] and resumed["pixel_auroc"] == fresh["pixel_auroc"]


def test_stale_error_txt_is_removed_on_success(fast_cfg, tmp_path, monkeypatch):
    from adtrain.run import run

    _crash_at_epoch(monkeypatch)
    over = ["trainer.max_epochs=2", "trainer.limit_train_batches=1"]
    with pytest.raises(RuntimeError):
        run(fast_cfg(*over), tmp_path)
    (tmp_path / "error.txt").write_text("RuntimeError: simulated crash\n")  # as __main__ writes it
    monkeypatch.undo()
    run(fast_cfg(*over, "resume=true"), tmp_path)
    assert (tmp_path / "results.json").exists() and not (tmp_path / "error.txt").exists()


def test_cli_refuses_a_finished_run_before_hydra_writes(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text('{"seed": 7}')
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("- seed=7\n")
    p = _cli(*FAST, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert p.returncode == 2
    _one_line_error(p.stderr, str(run_dir), "overwrite=true")
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == "- seed=7\n"  # the old record stays
    assert sorted(x.name for x in run_dir.iterdir()) == [".hydra", "results.json"]


def test_overwrite_never_clears_another_run_or_sweep_kept_inside_the_run_directory(tmp_path):
    """hydra.run.dir=outputs/a, later outputs/a/b: overwrite=true of a must not delete b with a's files."""
    from adtrain import rundir

    outer = tmp_path / "a"
    files = ("results.json", "config.yaml", "checkpoints/model.ckpt", "tasks/0/model.ckpt", "heatmaps/x.png",
             "wandb/run-1/files/config.yaml",  # W&B's own config.yaml: not a run
             "b/config.yaml", "b/results.json", "sweeps/s1/multirun.yaml", "sweeps/s1/0/results.json")
    for name in files:
        (outer / name).parent.mkdir(parents=True, exist_ok=True)
        (outer / name).write_text("x")
    assert rundir.nested_runs(outer) == [outer / "b", outer / "sweeps" / "s1"]
    with pytest.raises(ConfigError, match=rf"overwrite=true would clear {outer}, but it also holds 2 other run\(s\) "
                                          rf"or sweep\(s\) \(e.g. {outer / 'b'}\); nothing was deleted"):
        rundir.prepare_fresh(outer, overwrite=True)
    assert all((outer / name).exists() for name in files)

    (outer / "b").rename(tmp_path / "b")
    (outer / "sweeps").rename(tmp_path / "sweeps")
    rundir.prepare_fresh(outer, overwrite=True)
    assert list(outer.iterdir()) == [] and (tmp_path / "b" / "results.json").exists()


def test_a_kill_while_overwrite_clears_a_run_leaves_no_finished_marker(tmp_path, monkeypatch):
    """overwrite=true deletes the earlier run's files. A kill part way used to leave results.json beside a
    half-deleted run (checkpoints/ went first): Run.open read it as finished, adtrain.test then found no
    model.ckpt, and resume said "nothing to resume". results.json goes first now, what shows a run started
    last: whatever order the filesystem lists the entries in, what is left reads as an unfinished run."""
    import shutil

    import adtrain
    from adtrain import rundir

    run_dir = tmp_path / "run"
    for name in ("checkpoints/model.ckpt", "checkpoints/last.ckpt", "heatmaps/good__000.png", "csv/metrics.csv",
                 "scores.csv", "config.yaml", "results.json"):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("x")
    listed = Path.iterdir
    def results_json_last(self):  # the filesystem's order is anyone's: here the worst one
        return iter(sorted(listed(self), key=lambda p: p.name == "results.json"))

    monkeypatch.setattr(Path, "iterdir", results_json_last)
    real, removed = shutil.rmtree, []

    def killed_after_the_first_folder(path, *args, **kwargs):
        if removed:
            raise OSError("killed")
        removed.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(rundir.shutil, "rmtree", killed_after_the_first_folder)
    with pytest.raises(OSError, match="killed"):
        rundir.prepare_fresh(run_dir, overwrite=True)
    assert removed and not (run_dir / "results.json").exists()
    with pytest.raises(DataError, match="no results.json"):
        adtrain.Run.open(run_dir)
    with pytest.raises(ConfigError, match="did not finish"):  # a new run does not take it over unseen
        rundir.refuse_earlier(run_dir, overwrite=False)
    monkeypatch.undo()
    rundir.prepare_fresh(run_dir, overwrite=True)  # overwrite=true again finishes the clearing
    assert list(run_dir.iterdir()) == []


@pytest.mark.parametrize("cut", ["write_scores_csv", "log_test_outputs"])
def test_results_json_is_written_last_so_a_run_cut_short_resumes(fast_cfg, tmp_path, monkeypatch, cut):
    """results.json is what says a run finished. It used to be written before scores.csv, the histogram and
    the logger's test row: a kill in between left a run that resume called finished ("nothing to resume")
    while Run.scores() found no scores.csv. Now a run stopped before its last file is resumed to the end."""
    import adtrain
    import adtrain.engine as engine
    from adtrain.run import run

    def stopped(*args, **kwargs):
        raise OSError(28, "No space left on device")

    over = ["trainer.limit_train_batches=1"]
    monkeypatch.setattr(engine, cut, stopped)
    with pytest.raises(OSError, match="No space left"):
        run(fast_cfg(*over), tmp_path)
    assert (tmp_path / "checkpoints" / "model.ckpt").is_file() and not (tmp_path / "results.json").exists()
    with pytest.raises(DataError, match="no results.json"):
        adtrain.Run.open(tmp_path)
    monkeypatch.undo()
    res = run(fast_cfg(*over, "resume=true"), tmp_path)
    done = adtrain.Run.open(tmp_path)
    assert done["seed"] == res["seed"] == 0 and len(done.scores()) == res["num_test"] == 16
    assert done.histogram is not None


def test_a_schedule_cut_short_before_results_json_resumes_to_its_end(fast_cfg, tmp_path, monkeypatch):
    """The continual runner too writes results.json after scores.csv, the matrix plots and the logger's
    summary: a sequence stopped there is resumed (no task trained again), not called finished."""
    import adtrain
    import adtrain.continual.runner as runner
    from adtrain.run import run

    def stopped(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner, "log_final", stopped)
    with pytest.raises(OSError, match="No space left"):
        run(fast_cfg(*TINY_SCHEDULE[len(FAST):]), tmp_path)
    assert not (tmp_path / "results.json").exists()
    assert json.loads((tmp_path / "continual_state.json").read_text())["finished"] == [0, 1]
    monkeypatch.undo()
    _never_trains(monkeypatch)  # both tasks are finished: resume only writes what was left
    res = run(fast_cfg(*TINY_SCHEDULE[len(FAST):], "resume=true"), tmp_path)
    done = adtrain.Run.open(tmp_path)
    assert done.continual and done["matrices"] == res["matrices"] and len(done.scores()) == 12
    assert (tmp_path / "matrix_image_auroc.png").is_file()


# ---------------------------------------------------------------------------------------- resume
def _interrupted_run(fast_cfg, run_dir, monkeypatch, *over):
    from adtrain.run import run

    original = _crash_at_epoch(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(fast_cfg(*over), run_dir)
    from adtrain.methods.stfpm import Stfpm

    monkeypatch.setattr(Stfpm, "training_step", original)


def test_resume_refuses_another_experiment_with_a_diff(fast_cfg, tmp_path, monkeypatch):
    from adtrain.run import run

    over = ["trainer.max_epochs=2", "trainer.limit_train_batches=1"]
    _interrupted_run(fast_cfg, tmp_path, monkeypatch, *over)
    config_before = (tmp_path / "config.yaml").read_text()
    for change, key in (("method.lr=0.5", "method.lr"), ("data.size=96", "data.size"),
                        ("backbone=wide_resnet50_2", "backbone.name"), ("seed=3", "seed")):
        with pytest.raises(ConfigError, match=rf"resume.*{key}: .* -> "):
            run(fast_cfg(*over, change, "resume=true"), tmp_path)
    assert (tmp_path / "config.yaml").read_text() == config_before
    # run-time settings may change
    res = run(fast_cfg(*over, "resume=true", "trainer.enable_progress_bar=true", "output.heatmaps=1"), tmp_path)
    assert res["epochs_trained"] == 2
    assert (tmp_path / "config.yaml").read_text() == config_before  # the run's record is kept


def test_continual_resume_refuses_another_lr_image_size_or_data_size(fast_cfg, tmp_path, monkeypatch):
    from adtrain.methods.stfpm import Stfpm
    from adtrain.run import run

    original = Stfpm.training_step

    def crash_on_grid(self, batch, idx):
        if batch["category"][0] == "grid":
            raise RuntimeError("simulated crash")
        return original(self, batch, idx)

    monkeypatch.setattr(Stfpm, "training_step", crash_on_grid)
    over = [*TINY_SCHEDULE[len(FAST):], "trainer.limit_train_batches=1"]
    with pytest.raises(RuntimeError):
        run(fast_cfg(*over), tmp_path)
    monkeypatch.setattr(Stfpm, "training_step", original)
    for change, key in (("method.lr=0.01", "method.lr"), ("method.image_size=[48,48]", "method.image_size"),
                        ("data.size=48", "data.size"), ("data.num_train=12", "data.num_train")):
        with pytest.raises(ConfigError, match=rf"resume.*{key}"):
            run(fast_cfg(*over, change, "resume=true"), tmp_path)
    assert json.loads((tmp_path / "continual_state.json").read_text())["finished"] == [0]
    res = run(fast_cfg(*over, "resume=true"), tmp_path)
    assert len(res["matrices"]["image_auroc"]) == 2


def test_cli_resume_uses_the_runs_own_config_and_keeps_its_record(fast_cfg, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    # an interrupted run made with non-default choices (data=synthetic, resnet18 from random weights...)
    _interrupted_run(fast_cfg, run_dir, monkeypatch, "trainer.max_epochs=2", "trainer.limit_train_batches=1")
    (run_dir / ".hydra").mkdir()
    record = "- data=synthetic\n- trainer.max_epochs=2\n"
    (run_dir / ".hydra" / "overrides.yaml").write_text(record)
    config = (run_dir / "config.yaml").read_text()

    p = _cli(f"hydra.run.dir={run_dir}", "resume=true", "method.lr=0.5", cwd=tmp_path)
    assert p.returncode == 2
    _one_line_error(p.stderr, "method.lr", "->", str(run_dir))
    assert not (run_dir / "results.json").exists() and not (run_dir / "error.txt").exists()

    p = _cli(f"hydra.run.dir={run_dir}", "resume=true", "trainer.enable_progress_bar=false", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["data"] == "synthetic" and res["epochs_trained"] == 2  # not the default config (elpv)
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == record
    assert (run_dir / "config.yaml").read_text() == config


# ---------------------------------------------------------------------------------------- same seed, same result
def test_single_run_twice_gives_identical_metrics(fast_cfg, tmp_path):
    from adtrain.run import run

    over = ["trainer.max_epochs=2", "trainer.limit_train_batches=2"]
    torch.manual_seed(1)
    np.random.seed(1)
    a = run(fast_cfg(*over), tmp_path / "a")
    torch.manual_seed(2)
    np.random.seed(2)
    b = run(fast_cfg(*over), tmp_path / "b")
    assert {k: a.get(k) for k in COMPARED} == {k: b.get(k) for k in COMPARED}


def test_the_worker_count_does_not_change_a_trained_run(fast_cfg, tmp_path):
    """Persistent workers used to consume the global RNG differently from num_workers=0 (the
    loader's base seed once, not per epoch), so epoch 2's order and everything after it changed
    with data.num_workers; the order is now a function of (seed, epoch) (adtrain.data.sampling)."""
    from adtrain.run import run

    over = ["trainer.max_epochs=3", "output.heatmaps=0", AUGMENT]  # augmentation: drawn per item, not per worker
    a = run(fast_cfg(*over, "data.num_workers=0"), tmp_path / "a")
    b = run(fast_cfg(*over, "data.num_workers=2"), tmp_path / "b")
    assert {k: a.get(k) for k in COMPARED} == {k: b.get(k) for k in COMPARED}


def test_epoch_order_is_a_function_of_seed_and_epoch():
    from adtrain.data.sampling import EpochShuffle

    s = EpochShuffle(50, seed=3)
    first = list(s)
    torch.rand(100)  # the global RNG plays no part
    assert list(s) == first and sorted(d.index for d in first) == list(range(50))
    s.set_epoch(1)
    second = list(s)
    assert second != first and sorted(d.index for d in second) == list(range(50))
    s.set_epoch(0)
    assert list(s) == first and list(EpochShuffle(50, seed=4)) != first
    # each index carries the seed of its draws: distinct per item and epoch, the same on every pass
    assert len({d.seed for d in first} | {d.seed for d in second}) == 100
    assert {d.index: d.seed for d in first} == {d.index: d.seed for d in EpochShuffle(50, seed=3)}


def test_ddp_shards_of_an_epoch_are_its_single_process_order_with_the_same_draws():
    """Under DDP each rank takes every world-th item of the same (seed, epoch) order, padded as
    torch's DistributedSampler pads, each item with its single-process seed; Lightning keeps the
    sampler (a DistributedSampler) instead of its own, whose items' draws were the workers'."""
    from torch.utils.data import DistributedSampler

    from adtrain.data.sampling import EpochShard, EpochShuffle

    for n, world in ((10, 2), (10, 3), (2, 4), (0, 2)):
        whole = EpochShuffle(n, seed=5, epoch=2)
        shards = [EpochShard(n, seed=5, rank=r, world=world, epoch=0) for r in range(world)]
        for s in shards:
            s.set_epoch(2)  # as Lightning does
            assert isinstance(s, DistributedSampler) and len(list(s)) == len(s) == -(-n // world)
        order = list(whole)
        padded = order + (order * world)[: len(shards[0]) * world - n]
        assert [list(s) for s in shards] == [padded[r::world] for r in range(world)]
        assert {d for s in shards for d in s} == set(order)  # same Draw (index and seed) as one process


def test_a_resumed_trainer_s_first_loader_starts_at_its_epoch(tmp_path):
    """Lightning makes the first training iterator before set_epoch, and workers fetch their first
    indices at once: a resumed run replayed epoch 0's order at epoch k."""
    from types import SimpleNamespace

    from adtrain.data.sampling import EpochShuffle, next_epoch

    trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_progress=SimpleNamespace(
        current=SimpleNamespace(processed=3))))
    assert next_epoch(trainer) == 3 and next_epoch(None) == 0
    at3 = EpochShuffle(20, seed=1)
    at3.set_epoch(3)
    assert list(EpochShuffle(20, seed=1, epoch=next_epoch(trainer))) == list(at3) != list(EpochShuffle(20, seed=1))


def test_schedule_twice_gives_identical_metrics(fast_cfg, tmp_path):
    """The method used to be built before seed_everything: other initial weights on each run."""
    from adtrain.run import run

    over = [*TINY_SCHEDULE[len(FAST):], "trainer.limit_train_batches=1"]
    torch.manual_seed(1)
    a = run(fast_cfg(*over), tmp_path / "a")
    torch.manual_seed(2)
    b = run(fast_cfg(*over), tmp_path / "b")
    assert a["matrices"] == b["matrices"]
    assert {k: a.get(k) for k in COMPARED} == {k: b.get(k) for k in COMPARED}


def test_kill_9_mid_epoch_then_resume_ends_as_an_uninterrupted_run(tmp_path):
    """With 2 persistent workers and augmentation: the resumed epochs used to see epoch 0's order
    and restarted the workers' random streams (the schedule's kill test below runs without workers)."""
    over = [*(a for a in KILL_FAST if a != "data.num_workers=0"), "data.num_workers=2", AUGMENT]
    ref, run_dir = tmp_path / "ref", tmp_path / "run"
    proc = _start(*over, f"hydra.run.dir={run_dir}", cwd=tmp_path, log=tmp_path / "killed.log")
    metrics_csv = run_dir / "csv" / "metrics.csv"

    def mid_run() -> bool:  # last.ckpt is written before the CSV logger flushes: wait for both
        return (run_dir / "checkpoints" / "last.ckpt").exists() and metrics_csv.exists() and \
            len(metrics_csv.read_text().splitlines()) > 1

    rc = _signal_when(proc, mid_run, signal.SIGKILL)
    assert rc == -signal.SIGKILL and not (run_dir / "results.json").exists()
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)  # still plain data only
    before = first["callbacks"]["adtrain.RunState"]["fit_seconds"]
    rows_before = list(csv.DictReader(open(metrics_csv)))
    assert before > 0 and rows_before

    _resume_beside_reference(run_dir, ref, over, cwd=tmp_path, log=tmp_path / "resumed.log")
    res = json.loads((run_dir / "results.json").read_text())
    assert res["epochs_trained"] == 4 and res["fit_seconds"] > before  # cumulative over both sessions
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    assert len(rows) > len(rows_before) and "0" in {r.get("epoch") for r in rows}  # appended, not restarted
    assert _metrics(run_dir / "results.json") == _metrics(ref / "results.json")


def test_kill_9_mid_schedule_then_resume_ends_as_an_uninterrupted_run(tmp_path):
    over = [*TINY_SCHEDULE, "trainer.max_epochs=4", "logger=csv"]
    ref, run_dir = tmp_path / "ref", tmp_path / "run"
    proc = _start(*over, f"hydra.run.dir={run_dir}", cwd=tmp_path, log=tmp_path / "killed.log")
    last = run_dir / "tasks" / "1" / "checkpoints" / "last.ckpt"
    rc = _signal_when(proc, last.exists, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert json.loads((run_dir / "continual_state.json").read_text())["finished"] == [0]
    _resume_beside_reference(run_dir, ref, over, cwd=tmp_path, log=tmp_path / "resumed.log")
    a = json.loads((run_dir / "results.json").read_text())
    b = json.loads((ref / "results.json").read_text())
    assert a["matrices"] == b["matrices"] and _metrics(run_dir / "results.json") == _metrics(ref / "results.json")
    # csv/metrics.csv kept the finished task's row and got each later one once, as the uninterrupted run's

    def after_task(d):
        return [r["continual/after_task"] for r in csv.DictReader(open(d / "csv" / "metrics.csv"))
                if r.get("continual/after_task")]

    assert after_task(run_dir) == after_task(ref) == ["0", "1"]


def test_a_kill_between_the_state_and_a_tasks_row_still_logs_the_row_once(fast_cfg, tmp_path, monkeypatch):
    """The state lists task 1 as finished, then the run dies before logging its after_task row
    (log_row comes after state.save): the resume logs that row, and not task 0's again, though the
    kept csv/metrics.csv holds rows (it used to skip every finished task's row then: 0, 2)."""
    lost = 1
    from adtrain.continual import runner
    from adtrain.run import run

    class Killed(BaseException):  # as kill -9 would: no handler of the run's gets to act on it
        pass

    logged = runner.log_row

    def dies_at_lost(logger, t, *args):
        if t == lost:
            raise Killed
        logged(logger, t, *args)

    over = [*TINY_SCHEDULE, "schedule.tasks=[texture,grid,stripes]", "trainer.limit_train_batches=1", "logger=csv"]
    monkeypatch.setattr(runner, "log_row", dies_at_lost)
    with pytest.raises(Killed):
        run(fast_cfg(*over), tmp_path)
    assert json.loads((tmp_path / "continual_state.json").read_text())["finished"] == list(range(lost + 1))
    metrics = tmp_path / "csv" / "metrics.csv"

    def after_task():
        return [r["continual/after_task"] for r in csv.DictReader(open(metrics)) if r.get("continual/after_task")]

    assert after_task() == [str(t) for t in range(lost)] and len(list(csv.DictReader(open(metrics)))) > lost
    monkeypatch.setattr(runner, "log_row", logged)
    run(fast_cfg(*over, "resume=true"), tmp_path)
    assert after_task() == ["0", "1", "2"]


def test_ctrl_c_says_where_the_run_is_and_how_to_resume(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(*KILL_FAST, f"hydra.run.dir={run_dir}", cwd=tmp_path, log=tmp_path / "ctrl_c.log")
    rc = _signal_when(proc, lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), signal.SIGINT)
    text = (tmp_path / "ctrl_c.log").read_text()
    assert rc == 130, text[-3000:]
    assert "Traceback" not in text
    command = f"python -m adtrain hydra.run.dir={run_dir} resume=true"
    assert command in text and str(run_dir / "checkpoints" / "last.ckpt") in text
    p = _cli(*command.split()[3:], cwd=tmp_path)  # the printed command continues the run
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["epochs_trained"] == 4


@pytest.mark.parametrize("how", ["run", "sweep", "job_step"])
def test_sigterm_stops_a_run_or_a_sweep_with_status_143_and_says_how_to_resume(tmp_path, how):
    """SLURM, `timeout` and Kubernetes stop a job with SIGTERM. Lightning ends the fit with SIGTERMException,
    a SystemExit without a code: a run, or a whole sweep, used to end with status 0 and no word but
    Lightning's "Received SIGTERM". Now as Ctrl-C: where the run is, how to resume it, status 128 + 15.
    job_step: SLURM signals every process of the job, the loader workers too, whose death the run then
    met as a crash (a traceback, status 1)."""
    from adtrain.resume import resume_command, sweep_resume_command

    if how == "sweep":
        job = tmp_path / "sweep" / "0"
        args = ["-m", *KILL_FAST, "seed=0,1", f"hydra.sweep.dir={job.parent}"]
        command = sweep_resume_command(args, job.parent)
    else:
        job = tmp_path / "run"
        over = ([*(a for a in KILL_FAST if a != "data.num_workers=0"), "data.num_workers=2"] if how == "job_step"
                else KILL_FAST)
        args = [*over, f"hydra.run.dir={job}"]
        command = resume_command(job)
    group = how == "job_step"
    proc = _start(*args, cwd=tmp_path, log=tmp_path / "sigterm.log", group=group)
    rc = _signal_when(proc, (job / "checkpoints" / "last.ckpt").exists, signal.SIGTERM, group=group)
    text = (tmp_path / "sigterm.log").read_text()
    assert rc == 143, text[-3000:]
    assert "Traceback" not in text and not (job / "results.json").exists()
    said = [line for line in text.splitlines() if line.startswith("adtrain: interrupted (SIGTERM): ")]
    assert len(said) == 1 and str(job / "checkpoints" / "last.ckpt") in said[0], text[-3000:]
    assert said[0].endswith(f"Resume it with: {command}")
    if how == "sweep":  # the sweep stopped with its job: the next one never began
        assert "its unfinished ones run on resume" in said[0] and not (job.parent / "1").exists()


KILL_AFTER_JOB = """import os, signal
from hydra.experimental.callback import Callback


class KillAfterJob(Callback):  # the signal comes once a job has returned, before the next begins
    def __init__(self, sig):
        self.sig = getattr(signal, sig)

    def on_job_end(self, config, job_return, **kwargs):
        os.kill(os.getpid(), self.sig)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_between_a_sweeps_jobs_says_how_to_resume(tmp_path, sig):
    """Between two jobs of a sweep (Hydra's callbacks, the next job's set-up) SIGTERM ended the sweep
    without a word and Ctrl-C in a traceback from Hydra's callbacks. Now: the sweep's resume command,
    status 143 / 130 (the command itself is the one test_ctrl_c_in_a_sweep_offers_the_sweeps_command_not_the_jobs
    resumes a sweep with)."""
    from adtrain.resume import sweep_resume_command

    (tmp_path / "kill_after_job.py").write_text(KILL_AFTER_JOB)
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY_SCHEDULE[:-1], "seed=0,1", f"hydra.sweep.dir={sweep}"]
    kill = ["+hydra.callbacks.kill._target_=kill_after_job.KillAfterJob", f"+hydra.callbacks.kill.sig={sig}"]
    env = dict(_env(), PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-m", "adtrain", *args, *kill], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 128 + getattr(signal, sig), p.stderr[-3000:]
    assert "Traceback" not in p.stderr and (sweep / "0" / "results.json").exists() and not (sweep / "1").exists()
    said = [line for line in p.stderr.splitlines() if line.startswith("adtrain: interrupted")]
    assert len(said) == 1 and f"between the sweep's jobs (the last one ended in {sweep / '0'})" in said[0], p.stderr
    assert said[0].endswith(sweep_resume_command([*args, *kill], sweep))


@pytest.mark.parametrize("when", ["after_the_fit", "in_the_last_test_batch"])
def test_sigterm_outside_lightnings_checks_stops_the_cli_too(fast_cfg, tmp_path, monkeypatch, capsys, when):
    """Lightning acts on SIGTERM only inside its loops, between batches. Elsewhere (the threshold, the
    results) the signal killed the process without a word; in a test's last batch Lightning noted it and
    let the run go on, so a sweep went on to its next job. The CLI now stops either way, with status 143."""
    from adtrain.__main__ import main
    import adtrain.engine as engine
    from adtrain.methods.stfpm import Stfpm
    from adtrain.resume import resume_command

    if when == "after_the_fit":
        real_save = engine.save_method

        def save(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            return real_save(*args, **kwargs)

        monkeypatch.setattr(engine, "save_method", save)
    else:
        real_step = Stfpm.test_step

        def step(self, batch, idx):
            if idx == self.trainer.num_test_batches[0] - 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_step(self, batch, idx)

        monkeypatch.setattr(Stfpm, "test_step", step)

    def not_caught(signum, frame):
        raise AssertionError("SIGTERM reached the test's own handler: the CLI did not catch it")

    import adtrain.run

    monkeypatch.setattr(adtrain.run, "run_dir_from_hydra", lambda default=".": tmp_path)  # as Hydra's run.dir
    before = signal.signal(signal.SIGTERM, not_caught)
    try:
        with pytest.raises(SystemExit) as ex:
            main(fast_cfg("trainer.limit_train_batches=1"))
        assert signal.getsignal(signal.SIGTERM) is not_caught  # the CLI put the earlier handler back
    finally:
        signal.signal(signal.SIGTERM, before)
    err = capsys.readouterr().err
    assert ex.value.code == 143, err
    if when == "after_the_fit":
        assert not (tmp_path / "results.json").exists()
        assert (f"adtrain: interrupted (SIGTERM): the run in {tmp_path} stopped; its last checkpoint is "
                f"{tmp_path / 'checkpoints' / 'last.ckpt'}. Resume it with: {resume_command(tmp_path)}") in err, err
    else:
        assert (tmp_path / "results.json").exists()
        assert f"adtrain: interrupted (SIGTERM): the run in {tmp_path} had finished: its results are kept" in err, err


def test_sigterm_in_the_api_raises_terminated_not_a_silent_exit(fast_cfg, tmp_path, monkeypatch, capsys):
    """adtrain.fit and adtrain.test under SIGTERM ended in Lightning's SystemExit(None): a script exited
    with status 0 as if done. They raise Terminated, naming the run; like KeyboardInterrupt it is no
    Exception, so a loop's `except Exception` does not go on to its next run. The small commands
    (adtrain-bench's run) say it in one line with status 143."""
    import adtrain
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from adtrain.errors import Terminated
    from adtrain.methods.stfpm import Stfpm

    over = ["trainer.max_epochs=2", "trainer.limit_train_batches=1"]
    _crash_at_epoch(monkeypatch, error=SIGTERMException())
    run_dir = tmp_path / "run"
    with pytest.raises(Terminated, match=rf"{re.escape(str(run_dir))}: stopped by SIGTERM; .*resume=true") as ex:
        adtrain.fit(fast_cfg(*over), run_dir)
    assert not isinstance(ex.value, Exception)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "results.json").exists()
    monkeypatch.undo()
    done = adtrain.fit(fast_cfg(*over, "resume=true"), run_dir)  # as the error says
    assert done["epochs_trained"] == 2

    def step(self, batch, idx):
        raise SIGTERMException()

    monkeypatch.setattr(Stfpm, "test_step", step)
    with pytest.raises(Terminated, match=rf"{re.escape(str(done.run_dir))}: stopped by SIGTERM"):
        adtrain.test(done.run_dir)

    def bench(args):  # adtrain-bench runs through adtrain.run as fit does
        raise Terminated(tmp_path / "bench", "the same config with resume=true, into this run directory, continues it")

    from adtrain.cli import command

    with pytest.raises(SystemExit) as ex:
        command("adtrain-bench", "usage", bench, [])
    said = capsys.readouterr().err
    assert ex.value.code == 143 and said.startswith(f"adtrain-bench: interrupted: {tmp_path / 'bench'}: stopped by ")


# ---------------------------------------------------------------------------------------- bad input, before training
@pytest.fixture
def mvtec(tmp_path):
    from adtrain.data.testing import write_mvtec_tree

    return write_mvtec_tree(tmp_path / "mvtec", n_train=8, n_test_good=2, defects={"crack": 2}, size=48)


def _mvtec_cfg(base_cfg, root, *over):
    return base_cfg("data=mvtec", f"data.root={root}", "data.category=widget", "data.num_workers=0", *over)


@pytest.mark.parametrize("damage", ["corrupt", "zero_bytes", "mask_size"])
def test_bad_test_files_fail_before_training(base_cfg, mvtec, tmp_path, monkeypatch, damage):
    from adtrain.run import run

    _never_trains(monkeypatch)
    test_image = mvtec / "widget" / "test" / "crack" / "001.png"
    bad = test_image
    if damage == "corrupt":
        test_image.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image at all")
    elif damage == "zero_bytes":
        test_image.write_bytes(b"")
    else:
        bad = mvtec / "widget" / "ground_truth" / "crack" / "001_mask.png"
        Image.fromarray(np.zeros((40, 48), np.uint8)).save(bad)
    want = {"corrupt": "not a readable image", "zero_bytes": r"empty file \(0 bytes\)",
            "mask_size": "mask size 48x40 differs from image"}[damage]
    with pytest.raises(DataError, match=rf"^{bad}: {want}") as err:
        run(_mvtec_cfg(base_cfg, mvtec), tmp_path / "run")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("over, key, words", [
    ("threshold.quantile=1.5", "threshold.quantile", "must be in [0, 1]"),
    ("threshold.quantile=-0.1", "threshold.quantile", "must be in [0, 1]"),
    ("trainer.max_epochs=-1", "trainer.max_epochs", "train forever"),
    ("trainer.max_epochs=-3", "trainer.max_epochs", "must be >= 1"),
    ("trainer.max_epochs=0", "trainer.max_epochs", "nothing would train"),
    ("seed=abc", "seed", "whole number in [0, 2**32)"),
    ("seed=-1", "seed", "whole number in [0, 2**32)"),
    ("data.num_workers=-1", "data.num_workers", "whole number >= 0"),
    ("data.batch_size=abc", "data.batch_size", "whole number >= 1"),
])
def test_bad_config_values_fail_before_anything_is_written(fast_cfg, tmp_path, over, key, words):
    from adtrain.run import run

    with pytest.raises(ConfigError, match=key) as err:
        run(fast_cfg(over), tmp_path / "run")
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method, over, key", [
    ("patchcore", "method.coreset_ratio=2", "method.coreset_ratio"),
    ("cfa", "method.gamma_c=0", "method.gamma_c"),
    ("stfpm", "method.image_size=[0,0]", "method.image_size"),  # data.image_size is ${method.image_size}
])
def test_a_constructor_s_bad_argument_is_named_where_it_is_set(fast_cfg, tmp_path, method, over, key):
    """The constructor knows its argument as coreset_ratio; the user sets method.coreset_ratio."""
    from adtrain.run import run

    with pytest.raises(ConfigError) as err:
        run(fast_cfg(f"method={method}", over), tmp_path / "run")
    assert str(err.value).startswith(f"config key '{key}': ") and err.value.key == key


def test_a_test_that_fails_on_its_data_keeps_the_fitted_model(fast_cfg, tmp_path, monkeypatch):
    """An image that is found unreadable only while testing (cut short past its header) must not
    cost the fit: model.ckpt (threshold included) is written before the test, and adtrain.test
    tests it once the data are fixed."""
    import adtrain
    import adtrain.engine as engine
    from adtrain.run import run

    real = engine.evaluate_method

    def broken(*args, **kwargs):
        raise DataError("test/broken/001.png", "cannot read image: image file is truncated")

    monkeypatch.setattr(engine, "evaluate_method", broken)
    with pytest.raises(DataError):
        run(fast_cfg("method=patchcore"), tmp_path / "run")
    fitted = tmp_path / "run" / "checkpoints" / "model.ckpt"
    assert fitted.is_file() and not (tmp_path / "run" / "results.json").exists()
    monkeypatch.setattr(engine, "evaluate_method", real)
    figures = adtrain.test(fitted)
    assert figures["image_auroc"] is not None and figures["num_test"] > 0


def test_a_missing_mandatory_value_names_its_key(base_cfg, tmp_path):
    from adtrain.run import run

    with pytest.raises(ConfigError, match="data.normal_dir") as err:
        run(base_cfg("data=folder"), tmp_path / "run")
    assert "missing" in str(err.value) and not (tmp_path / "run").exists()
    assert err.value.key == "data.normal_dir" and "e.g. data.normal_dir=" in str(err.value)  # the key to set, once
    from adtrain.build import _instantiate

    cfg = base_cfg("method=patchcore", "data=synthetic")
    cfg.method.coreset_ratio = "???"
    detached = OmegaConf.create({"_target_": cfg.method._target_, "coreset_ratio": "???"})
    for node in (cfg.method, detached):  # a node of the whole config, or one of its own
        with pytest.raises(ConfigError) as err:
            _instantiate(node, "method")
        assert err.value.key == "method.coreset_ratio"
    cfg.method.coreset_ratio = "abc"  # a conversion error inside the constructor names the key holding 'abc'
    from adtrain.build import build_method

    with pytest.raises(ConfigError, match="could not convert string to float: 'abc'") as err:
        build_method(cfg)
    assert err.value.key == "method.coreset_ratio"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_gpu_without_gpu_is_one_line(fast_cfg, tmp_path):
    from adtrain.run import run

    with pytest.raises(ConfigError, match="trainer.accelerator.*no CUDA GPU"):
        run(fast_cfg("trainer.accelerator=gpu"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_impossible_run_directory_is_one_line(fast_cfg, tmp_path):
    from adtrain.run import run

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match=rf"hydra.run.dir.*cannot write into {tmp_path}/a_file/run"):
        run(fast_cfg(), tmp_path / "a_file" / "run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_checkpoints_fail_before_training(fast_cfg, tmp_path, monkeypatch):
    from adtrain.run import run

    _never_trains(monkeypatch)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints").chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="cannot write into .*checkpoints: permission denied"):
            run(fast_cfg(), tmp_path)
    finally:
        (tmp_path / "checkpoints").chmod(0o755)


def test_checkpoints_that_cannot_be_made_fail_before_training(fast_cfg, tmp_path, monkeypatch):
    from adtrain.run import run

    _never_trains(monkeypatch)
    (tmp_path / "a_file").write_text("x")
    os.symlink(tmp_path / "a_file" / "ckpts", tmp_path / "checkpoints")  # leads below a file
    with pytest.raises(ConfigError, match="cannot write into .*checkpoints"):
        run(fast_cfg(), tmp_path)


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "a_file").write_text("x")
    p = _cli(*FAST, f"hydra.run.dir={tmp_path}/a_file/run", cwd=tmp_path)
    assert p.returncode == 2
    _one_line_error(p.stderr, "hydra.run.dir", f"{tmp_path}/a_file/run")
    p = _cli(*FAST, "trainer.max_epochs=-1", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path)
    assert p.returncode == 2
    _one_line_error(p.stderr, "trainer.max_epochs", "forever")
    assert not (tmp_path / "r").exists()  # nothing written, not even Hydra's .hydra/


def test_a_data_error_in_a_loader_worker_is_one_line(base_cfg, mvtec, tmp_path):
    from adtrain.run import run

    img = mvtec / "widget" / "train" / "good" / "003.png"
    img.write_bytes(img.read_bytes()[:-40])  # the header reads, the pixels do not
    with pytest.raises(DataError) as err:
        run(_mvtec_cfg(base_cfg, mvtec, "data.num_workers=1"), tmp_path / "run")
    text = str(err.value)
    assert text.startswith(f"{img}: cannot read image") and "\n" not in text and "Traceback" not in text


# ---------------------------------------------------------------------------------------- predict
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from adtrain.run import run
    from tests.conftest import compose

    run_dir = tmp_path_factory.mktemp("trained")
    run(compose(*FAST, "trainer.limit_train_batches=1"), run_dir)
    return run_dir


def _images(folder: Path, names: list[str]) -> Path:
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.random.default_rng(i).random((40, 40, 3)) * 255).astype(np.uint8)).save(folder / name)
    return folder


def _predict(capsys, *args):
    from adtrain.predict import main

    with pytest.raises(SystemExit) as ex:
        main(list(args))
    return ex.value.code, capsys.readouterr().err


def test_predict_names_heatmaps_by_folder_and_clears_an_earlier_call(trained, tmp_path):
    from adtrain.predict import predict

    imgs = _images(tmp_path / "new", ["good/000.png", "crack/000.png", "crack/001.png"])
    out = predict(str(trained / "checkpoints" / "model.ckpt"), str(imgs))
    assert out == trained / "predictions"  # beside the checkpoint's run
    assert sorted(p.name for p in (out / "heatmaps").glob("*.png")) == ["crack__000.png", "crack__001.png",
                                                                       "good__000.png"]
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert {r["heatmap"] for r in rows} == {"heatmaps/crack__000.png", "heatmaps/crack__001.png",
                                            "heatmaps/good__000.png"}
    # drawn as the run's test heatmaps (colour bar, threshold), output.heatmap_size's 320 px panels, not thumbnails
    assert Image.open(out / "heatmaps" / "good__000.png").height > 320
    other = _images(tmp_path / "other", ["scratch/000.png"])
    mine = out / "heatmaps" / "mine.png"  # a file predict did not write: kept by the next call
    mine.write_bytes(b"not predict's")
    predict(str(trained / "checkpoints" / "model.ckpt"), str(other))
    assert mine.read_bytes() == b"not predict's"
    mine.unlink()
    assert [p.name for p in (out / "heatmaps").glob("*.png")] == ["other__scratch__000.png"] or \
        [p.name for p in (out / "heatmaps").glob("*.png")] == ["scratch__000.png"]
    assert len(list(csv.DictReader(open(out / "predictions.csv")))) == 1
    # a call that fails on an unreadable image leaves the earlier call's output as it was
    before = sorted(p.name for p in (out / "heatmaps").glob("*.png")), (out / "predictions.csv").read_bytes()
    broken = _images(tmp_path / "broken", ["good/000.png", "good/001.png"])
    (broken / "good" / "001.png").write_bytes((broken / "good" / "001.png").read_bytes()[:200])  # cut short
    with pytest.raises(DataError, match="001.png"):
        predict(str(trained / "checkpoints" / "model.ckpt"), str(broken), batch_size=1)
    assert (sorted(p.name for p in (out / "heatmaps").glob("*.png")), (out / "predictions.csv").read_bytes()) == before
    assert not list(out.glob(".predict-*"))
    # out= a run directory would mix into (and once cleared) the test's heatmaps: refused, nothing touched
    test_heatmaps = sorted((trained / "heatmaps").iterdir())
    with pytest.raises(ConfigError, match="is a run directory") as err:
        predict(str(trained / "checkpoints" / "model.ckpt"), str(other), out=str(trained))
    assert err.value.key == "out" and sorted((trained / "heatmaps").iterdir()) == test_heatmaps
    project = tmp_path / "project"  # a folder that merely holds a checkpoints/ folder is not a run: allowed
    (project / "checkpoints").mkdir(parents=True)
    assert predict(str(trained / "checkpoints" / "model.ckpt"), str(other), out=str(project)) == project


def test_predict_on_error_skip_scores_the_rest_and_lists_the_unreadable(trained, tmp_path, caplog):
    """on_error=skip: a cut-short file and a non-image get rows with their reason and no score; the
    readable images are scored as a clean call scores them; a call where nothing reads still fails."""
    from adtrain.predict import predict

    ckpt = str(trained / "checkpoints" / "model.ckpt")
    imgs = _images(tmp_path / "mixed", ["a/000.png", "a/001.png", "a/002.png", "b/000.png"])
    clean = {r["path"]: r for r in csv.DictReader(open(predict(ckpt, str(imgs), out=str(tmp_path / "clean")) /
                                                      "predictions.csv"))}
    assert all(r["error"] == "" for r in clean.values())
    (imgs / "a" / "001.png").write_bytes((imgs / "a" / "001.png").read_bytes()[:200])  # cut short
    (imgs / "b" / "000.png").write_bytes(b"not an image at all")
    with caplog.at_level(logging.WARNING, logger="adtrain"):
        out = predict(ckpt, str(imgs), out=str(tmp_path / "skip"), batch_size=2, on_error="skip")
    rows = {r["path"]: r for r in csv.DictReader(open(out / "predictions.csv"))}
    assert set(rows) == set(clean)
    bad = {p for p, r in rows.items() if r["error"]}
    assert {Path(p).relative_to(imgs).as_posix() for p in bad} == {"a/001.png", "b/000.png"}
    for p in bad:
        assert rows[p]["score"] == "" and rows[p]["heatmap"] == "" and rows[p]["is_anomalous"] == ""
    for p in set(rows) - bad:
        assert float(rows[p]["score"]) == pytest.approx(float(clean[p]["score"]), rel=1e-5)
        assert (out / rows[p]["heatmap"]).is_file()
    assert len(list((out / "heatmaps").glob("*.png"))) == 2
    assert any("2 of 4 images could not be read" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError, match=r"no image could be read \(1 given"):
        predict(ckpt, str(imgs / "b") + "/*.png", out=str(tmp_path / "none"), on_error="skip")
    with pytest.raises(ConfigError, match="on_error"):
        predict(ckpt, str(imgs), on_error="ignore")


def test_predict_outside_a_run_writes_beside_the_checkpoint(trained, tmp_path):
    from adtrain.predict import predict

    (tmp_path / "models").mkdir()
    ckpt = tmp_path / "models" / "model.ckpt"
    ckpt.write_bytes((trained / "checkpoints" / "model.ckpt").read_bytes())
    out = predict(str(ckpt), str(_images(tmp_path / "new", ["a.png"])))
    assert out == tmp_path / "models" / "predictions" and (out / "predictions.csv").exists()
    assert not (tmp_path / "predictions").exists()


def test_predict_refuses_a_checkpoint_without_a_threshold(trained, tmp_path, capsys):
    imgs = _images(tmp_path / "new", ["a.png"])
    code, err = _predict(capsys, f"checkpoint={trained}/checkpoints/last.ckpt", f"images={imgs}", f"out={tmp_path}/o")
    assert code == 2 and "no fitted threshold" in err and "last.ckpt" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_predict_bad_arguments_are_one_line(trained, tmp_path, capsys):
    imgs = _images(tmp_path / "new", ["a.png"])
    ckpt = f"checkpoint={trained}/checkpoints/model.ckpt"
    code, err = _predict(capsys, ckpt, f"images={imgs}", "batch_size=0")
    assert code == 2 and "batch_size" in err and ">= 1" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "a_file").write_text("x")
    for arg, said in (("num_workers=-1", "'num_workers': must be a whole number >= 0"),
                      ("anomaly_maps=maybe", "'anomaly_maps': must be true or false"),
                      (f"out={tmp_path / 'a_file'}", "'out': cannot make the folder")):
        code, err = _predict(capsys, ckpt, f"images={imgs}", arg)
        assert code == 2 and said in err and len(err.strip().splitlines()) == 1, err
    if not torch.cuda.is_available():
        code, err = _predict(capsys, ckpt, f"images={imgs}", "device=cuda")
        assert code == 2 and "device" in err and "no CUDA GPU" in err and len(err.strip().splitlines()) == 1


def test_a_run_without_held_out_normals_warns_and_predict_says_why_it_cannot_decide(fast_cfg, tmp_path, caplog):
    """data.val_split=0 (the papers' "all normals into the bank"): threshold-free figures, a warning
    that says so at the run, and adtrain.predict's refusal names the cause, not only "a training
    checkpoint" (the finished run's own model.ckpt is what the user passes)."""
    
    from adtrain.predict import predict
    from adtrain.run import run

    with caplog.at_level(logging.WARNING, logger="adtrain"):
        result = run(fast_cfg("method=patchcore", "data.val_split=0", "output.heatmaps=0"), tmp_path / "run")
    assert result["threshold"] is None and result["image_auroc"] is not None
    import adtrain

    rows = adtrain.Run.open(tmp_path / "run").scores()  # no threshold, no prediction: None, not ""
    assert rows and all(r["prediction"] is None and isinstance(r["score"], float) for r in rows)
    assert any("No held-out normals (data.val_split=0" in r.getMessage() for r in caplog.records)
    ckpt = tmp_path / "run" / "checkpoints" / "model.ckpt"
    images = next(p for p in (tmp_path / "run").rglob("*.png"))
    with pytest.raises(DataError, match=r"model.ckpt: holds no fitted threshold: .*data.val_split=0") as err:
        predict(str(ckpt), str(images), out=str(tmp_path / "pred"))
    assert "\n" not in str(err.value) and not (tmp_path / "pred").exists()


def test_a_test_set_of_one_label_is_said_before_its_figures_are_null(fast_cfg, tmp_path, caplog):
    
    from adtrain.run import run

    with caplog.at_level(logging.INFO, logger="adtrain"):
        result = run(fast_cfg("method=patchcore", "data.num_test_anomalous=0", "output.heatmaps=0"), tmp_path / "run")
    assert result["image_auroc"] is None and result["test_at_threshold"]["tn"] + result["test_at_threshold"]["fp"] == 8
    assert any("The test set holds no anomalous image (8 images)" in r.getMessage() for r in caplog.records)
    # the kept state names a file that is there: a one-pass method takes no optimiser step, so no last.ckpt
    assert result["selected_checkpoint"] == "model.ckpt" and not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    assert any("Kept the last state (model.ckpt, after 1 epoch)" in r.getMessage() for r in caplog.records)


def test_ctrl_c_in_a_sweep_offers_the_sweeps_command_not_the_jobs(tmp_path, monkeypatch, capsys):
    """Resuming the stopped job's folder alone would never run the later jobs nor write the summary."""
    import types

    import hydra.core.hydra_config

    import adtrain.__main__ as entry
    from adtrain.resume import sweep_resume_command

    from hydra.core.override_parser.overrides_parser import OverridesParser

    argv = ["-m", "method=stfpm", "seed=0,1,2", "++hydra.sweep.dir=old", "+resume=false"]
    assert sweep_resume_command(argv, "/sw/x") == "python -m adtrain -m method=stfpm seed=0,1,2 hydra.sweep.dir=/sw/x resume=true"
    for folder in ("/s w", "/a,b/c", "/a(b)/c", "/it's"):  # a comma would make it a sweep of two folders
        words = shlex.split(sweep_resume_command(argv, folder))
        assert words[-1] == "resume=true" and sum(w.lstrip("+").startswith("hydra.sweep.dir") for w in words) == 1
        assert OverridesParser.create().parse_override(words[-2]).value() == folder
    job = tmp_path / "sweep" / "1"
    (job / "checkpoints").mkdir(parents=True)
    (job / "checkpoints" / "last.ckpt").write_bytes(b"x")
    monkeypatch.setattr(entry, "_is_multirun", lambda: True)
    monkeypatch.setattr(hydra.core.hydra_config.HydraConfig, "get",
                        staticmethod(lambda: types.SimpleNamespace(sweep=types.SimpleNamespace(dir=str(job.parent)))))
    monkeypatch.setattr(sys, "argv", ["adtrain", "-m", "method=stfpm", "seed=0,1,2"])
    with pytest.raises(SystemExit) as ex:
        entry._interrupted(job)
    err = capsys.readouterr().err
    want = f"python -m adtrain -m method=stfpm seed=0,1,2 hydra.sweep.dir={job.parent} resume=true"
    assert ex.value.code == 130 and "its unfinished ones run on resume" in err and err.strip().endswith(want)
    (job / "checkpoints" / "last.ckpt").unlink()  # stopped before its first checkpoint: still the sweep's command
    with pytest.raises(SystemExit):
        entry._interrupted(job)
    err = capsys.readouterr().err
    assert "run the same command again" not in err and err.strip().endswith(want)
