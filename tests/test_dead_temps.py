"""A write killed midway leaves its temp (a checkpoint's is checkpoint-sized; an image cache build
reserves its whole entry): the next run that takes the directory's lock, and each cache's eviction,
delete the temps of ended processes and keep a live one's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def test_a_run_directory_s_lock_deletes_an_ended_write_s_temps(tmp_path, dead_pid):
    from adtrain import rundir
    from adtrain.io import TEMP_NAME, temp_name, write_json

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    dead = ckpts / f".last.ckpt.{dead_pid}-0123456789ab.tmp"
    dead.write_bytes(b"x" * 1000)
    live = tmp_path / temp_name("results.json")  # this process's own write in progress
    live.write_text("{")
    other = tmp_path / ".notes.tmp"  # not adtrain's
    other.write_text("mine")
    assert TEMP_NAME.match(live.name) and int(TEMP_NAME.match(live.name).group(1)) == os.getpid()
    assert rundir.acquire(tmp_path)
    try:
        assert not dead.exists() and live.exists() and other.exists()
    finally:
        rundir.release(tmp_path)
    write_json(tmp_path / "r.json", {"a": 1})  # an atomic write's temp carries the pid, and is gone after
    assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == sorted([live.name, other.name])


def test_the_image_cache_deletes_a_killed_build_and_keeps_a_live_one(tmp_path, dead_pid):
    from adtrain.data.image_cache import ImageCache
    from adtrain.io import temp_name

    dead = tmp_path / f".abc.{dead_pid}-0123456789ab.tmp"
    live = tmp_path / temp_name("def")
    for d in (dead, live):
        d.mkdir()
        (d / "images.npy").write_bytes(b"\0" * 4096)
    ImageCache(tmp_path, "auto", 1.0).evict()
    assert not dead.exists() and live.is_dir()


def test_the_feature_cache_sweeps_ended_writes_once(tmp_path, dead_pid):
    """A killed write's temp in the feature cache goes at the cache's first eviction; the sweep is
    not repeated after every stored batch (a directory scan on the extraction path)."""
    from adtrain.backbones.feature_cache import FeatureCache

    cache = FeatureCache(tmp_path, 1.0)
    dead = tmp_path / f".ab.pt.{dead_pid}-0123456789ab.tmp"
    dead.write_bytes(b"x")
    cache.evict()
    assert not dead.exists()
    dead.write_bytes(b"x")
    cache.evict()
    assert dead.exists()  # swept once per cache: the next run's cache removes it
