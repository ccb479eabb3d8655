"""Fault injection (issue 11), run directories and resume: runs that cannot be mixed up or lost, resume
that continues the same experiment. docs/RELIABILITY.md lists what each test holds; the kill and signal
tests are in test_kills.py, bad input in test_bad_input.py, predict in test_predict.py."""

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from adtrain.errors import ConfigError, DataError
from tests.conftest import FAST
from tests.reliability import _cli, _start, _one_line_error, _never_trains, _crash_at_epoch, TINY_SCHEDULE


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
