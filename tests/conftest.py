"""Shared test helpers: compose the real Hydra config with small, fast overrides."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# `make test` runs two pytest-xdist workers on 2 cores: one thread each (and in the runs they start), or
# torch's, FAISS's and OpenMP's thread pools spin against each other and the suite runs slower than on one
TEST_THREADS = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
if TEST_THREADS == "1":
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_var] = TEST_THREADS
import torch  # noqa: E402  (after the thread counts)

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(int(TEST_THREADS), os.cpu_count() or 1))
# the image and feature caches (paths.cache_dir) of every test, and of the runs tests start, in a temp
# folder removed at exit: tests never write to ~/.cache/adtrain
_CACHE_DIR = tempfile.mkdtemp(prefix="adtrain-test-cache-")
os.environ["ADTRAIN_CACHE_DIR"] = _CACHE_DIR
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "src" / "adtrain" / "conf"

# A small, quick run on synthetic data: what most end-to-end tests start from.
FAST_BASE = [
    "method.image_size=[64,64]",
    "method.center_crop=null",
    "method.batch_size=8",
    "backbone=resnet18",
    "backbone.pretrained=false",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "output.heatmaps=2",
]
FAST = [
    "data=synthetic",
    "data.num_train=24",
    "data.num_test_normal=8",
    "data.num_test_anomalous=8",
    "data.num_workers=0",
    *FAST_BASE,
]


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


@pytest.fixture
def base_cfg():
    """The fast settings without a data choice: pass data=... yourself."""

    def make(*overrides: str):
        return compose(*FAST_BASE, *overrides)

    return make


@pytest.fixture
def fast_cfg():
    def make(*overrides: str):
        return compose(*FAST, *overrides)

    return make


@pytest.fixture
def one_faiss_thread():
    """Tests run beside others on 2 cores: OpenMP spinning in FAISS makes small jobs crawl."""
    import faiss  # in the dev extra (faiss-cpu): a broken install fails the tests, it does not skip them

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(autouse=True)
def _signal_handlers_as_they_were():
    """A test that runs the CLI in this process may leave its signal handlers behind (Lightning sets
    SIGINT to ignored after a KeyboardInterrupt, a sweep its between-jobs handler); the next test, and
    every process it starts, would inherit them: what a test sees must not depend on the one before."""
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in before.items():
        if handler is not None and signal.getsignal(s) is not handler:
            signal.signal(s, handler)
