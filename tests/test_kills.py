"""Fault injection (issue 11): the same seed gives the same result, and a run or a sweep killed or
signalled (kill -9, SIGTERM, Ctrl-C) resumes to what an uninterrupted run gives, saying how to resume."""

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import FAST
from tests.reliability import (
    _env, _cli, _start, _resume_beside_reference, _signal_when, _metrics, _crash_at_epoch, KILL_FAST, AUGMENT,
    TINY_SCHEDULE, COMPARED,
)


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
