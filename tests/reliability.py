"""Helpers of the fault-injection tests (test_reliability, test_kills, test_bad_input, test_predict):
the CLI in a subprocess, signals at the right moment, one-line errors, crashes injected into STFPM."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def _as_a_foreground_job() -> None:
    """In the child before exec: SIGINT as a terminal's foreground job has it. A suite started in the
    background of a script (`make test &`, a CI runner) inherits SIGINT ignored, as POSIX shells start
    background jobs, and Python then installs no KeyboardInterrupt: the run would ignore the Ctrl-C the
    test sends. (It passed by chance where an earlier test in the worker had set a SIGINT handler.)"""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(*args, cwd, log, group=False):
    """group: the run leads a process group of its own (its loader workers in it), as a SLURM job step."""
    out = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "adtrain", *args], cwd=cwd, env=_env(), stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=group, preexec_fn=_as_a_foreground_job)


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
