"""trainer=ddp (2 CPU processes, gloo) gives the single-process answer (adtrain.distributed, adtrain.strategy).

One CLI run per method and mode. PatchCore (with pixel metrics at the images' own sizes) and HETMM are
training-free: the bank is identical and the figures equal. CFA and DFM run at learning rate 0 (a
trained comparison cannot be exact: DDP averages gradients over shards of a batch): their memory is
built from the same images in the same order, so the figures match to 1e-6 (CPU reductions on one thread
per rank may differ in the last bits). STFPM trains: DDP cannot be bit-identical to one process, so its
test asserts what is true (the ranks agree on the test metrics, or the run fails: engine.evaluate_method
checks it; every test image once; results.json computed from the very scores in scores.csv).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from adtrain.errors import ConfigError
from adtrain.metrics.image import image_metrics
from tests.conftest import FAST

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"fit_seconds", "val_seconds", "test_seconds", "test_images_per_second", "peak_memory_mb",
          "image_cache", "feature_cache", "feature_cache_lookups", "nested_cache", "nested_cache_lookups"}  # not results: the second run hits the cache
EXACT = {"hetmm": [], "cfa": ["method.lr=0"],  # PatchCore: test_ddp_patchcore_gives_the_single_process_answer_...
         "dfm": ["trainer.max_epochs=2", "method.rounds=1", "method.stage1_epochs=1", "method.stage2_epochs=1",
                 "method.lr_adapter=0", "method.lr_fmn=0", "method.memory_size=30"]}


def _start(run_dir: Path, *args: str, base: list[str] = FAST) -> subprocess.Popen:
    """Start one CLI run. A thread drains its output (rank 0's and the ranks it starts) into a log beside
    run_dir until every rank has closed it: two runs at once never block on a full pipe."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "adtrain", *base, *args, f"hydra.run.dir={run_dir}"],
                            cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own group: a failed test ends every rank
    log = run_dir.parent / f"{run_dir.name}.log"
    proc.drain = threading.Thread(target=lambda: log.write_bytes(proc.stdout.read()), daemon=True)
    proc.drain.start()
    return proc


def _finish(proc: subprocess.Popen, run_dir: Path) -> dict:
    try:
        rc = proc.wait(timeout=600)
        proc.drain.join(timeout=120)  # the other ranks end too (as subprocess.run waited for the pipe's end)
    finally:
        _end(proc)
    assert rc == 0, (run_dir.parent / f"{run_dir.name}.log").read_text(errors="replace")[-3000:]
    assert list(run_dir.rglob("results.json")) == [run_dir / "results.json"]  # one results.json, rank 0's
    return json.loads((run_dir / "results.json").read_text())


def _end(proc: subprocess.Popen) -> None:
    """Nothing of a run outlives its test: whatever is left of its process group is killed (once)."""
    if getattr(proc, "ended", False):
        return
    proc.ended = True
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    proc.drain.join(timeout=10)
    proc.stdout.close()


def _cli(run_dir: Path, *args: str) -> dict:
    return _finish(_start(run_dir, *args), run_dir)


def _single(run_dir: Path, *args: str, base: list[str] = FAST) -> dict:
    """The single-process run of a config, in this process (adtrain.run.run, what the CLI runs): no second
    Python and torch start-up to pay for the reference."""
    from adtrain.run import run
    from tests.conftest import compose

    run(compose(*base, *args), run_dir)
    assert list(run_dir.rglob("results.json")) == [run_dir / "results.json"]
    return json.loads((run_dir / "results.json").read_text())


def _single_and_ddp(tmp_path: Path, args: list[str], ddp: list[str], base: list[str] = FAST) -> tuple[dict, dict]:
    """The single-process run and the DDP run of one config, at the same time: they share nothing (own
    run directories). The DDP run (the CLI, as a user starts it) goes first, in the background; the
    single-process reference runs in this process meanwhile."""
    proc = _start(tmp_path / "ddp", *args, *ddp, base=base)
    try:
        return _single(tmp_path / "single", *args, base=base), _finish(proc, tmp_path / "ddp")
    finally:
        _end(proc)


def _scores(run_dir: Path) -> list[dict]:
    with open(run_dir / "scores.csv") as f:
        return list(csv.DictReader(f))


def _same(single: dict, ddp: dict, tol: float) -> None:
    for key, value in single.items():
        if key in TIMING or key == "selection":
            continue
        _close(ddp[key], value, tol, key)


def _close(got, want, tol: float, key: str) -> None:
    """Equal, floats within tol, into nested dicts (e.g. pixel_test_at_threshold's fitted threshold)."""
    if isinstance(want, dict) and isinstance(got, dict):
        assert set(got) == set(want), key
        for k in want:
            _close(got[k], want[k], tol, f"{key}.{k}")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=tol), key
    else:
        assert got == want, key


def _same_outputs(tmp_path: Path, exact: bool) -> None:
    """scores.csv (dataset order, each image once) and the heatmaps of the DDP run are the single run's."""
    a, b = _scores(tmp_path / "single"), _scores(tmp_path / "ddp")
    assert [r["path"] for r in b] == [r["path"] for r in a]  # dataset order, no repeat
    assert [float(r["score"]) for r in b] == pytest.approx([float(r["score"]) for r in a], abs=0 if exact else 1e-6)
    assert sorted(p.name for p in (tmp_path / "ddp" / "heatmaps").iterdir()) == \
        sorted(p.name for p in (tmp_path / "single" / "heatmaps").iterdir())


@pytest.mark.parametrize("method", sorted(EXACT))
def test_ddp_gives_the_single_process_answer(tmp_path, method):
    args = [f"method={method}", *EXACT[method]]
    single, ddp = _single_and_ddp(tmp_path, args, ["trainer=ddp", "trainer.devices=2"])
    exact = method == "hetmm"
    _same(single, ddp, 0.0 if exact else 1e-6)
    assert ddp["num_test"] == single["num_test"] == 16
    _same_outputs(tmp_path, exact=exact)


def test_ddp_patchcore_gives_the_single_process_answer_with_pixels_at_the_images_own_sizes(tmp_path):
    """PatchCore is training-free: the bank and every figure are identical. With metrics.resolution=source
    each rank's maps are at their images' sizes (two sizes, in batches that mix them), replayed as one
    process counts them; 11 test images on 2 ranks: the sampler pads one rank with a repeat, counted once."""
    from adtrain.data.testing import write_mvtec_tree
    from tests.conftest import FAST_BASE

    root = tmp_path / "mvtec"
    write_mvtec_tree(root, "c1", n_train=8, n_test_good=2, defects={"crack": 3}, size=160, seed=1)
    write_mvtec_tree(root, "c2", n_train=8, n_test_good=3, defects={"crack": 3}, size=120, seed=2)
    args = ["data=mvtec", f"data.root={root}", "data.category=[c1,c2]", "data.num_workers=0", "data.val_split=0.25",
            "method=patchcore", "method.image_size=[40,40]", "method.center_crop=[32,32]", "method.batch_size=4",
            "metrics.resolution=source", "metrics.exact_pixels=0"]  # streamed: the updates' order counts
    single, ddp = _single_and_ddp(tmp_path, args, ["trainer=ddp", "trainer.devices=2"], base=FAST_BASE)
    _same(single, ddp, 0.0)
    assert ddp["num_test"] == single["num_test"] == 11
    _same_outputs(tmp_path, exact=True)
    banks = [torch.load(tmp_path / d / "checkpoints" / "model.ckpt", weights_only=False)["state_dict"]
             for d in ("single", "ddp")]
    assert banks[0]["model.memory.bank"].numel() > 0
    assert torch.equal(banks[0]["model.memory.bank"], banks[1]["model.memory.bank"])
    assert ddp["pixel_resolution"] == "source" and ddp["pixel_metrics_exact"] is False
    decided = ddp["pixel_test_at_threshold"]
    assert decided["tp"] + decided["fp"] + decided["fn"] + decided["tn"] == 5 * 160 ** 2 + 6 * 120 ** 2  # each pixel once


TRAINED = {"stfpm": [],  # DFM trained (lr > 0): its memory is resized after DDP wraps the module
           "dfm": ["trainer.max_epochs=2", "method.rounds=1", "method.stage1_epochs=1", "method.stage2_epochs=1",
                   "method.memory_size=30"]}


@pytest.mark.parametrize("method", sorted(TRAINED))
def test_ddp_trained_method_scores_every_test_image_once(tmp_path, method):
    """Trained under DDP (gradients averaged over shards: not the single-process numbers). The run
    itself fails (distributed.check_parameters_agree) if the ranks' parameters differ after the fit."""
    res = _cli(tmp_path / "ddp", f"method={method}", *TRAINED[method], "trainer=ddp", "trainer.devices=2",
               "data.augment=[{_target_:albumentations.HorizontalFlip,p:0.5}]")  # per-item draws (adtrain.data.sampling)
    rows = _scores(tmp_path / "ddp")
    assert res["num_test"] == len(rows) == len({r["path"] for r in rows}) == 16
    scores, labels = [float(r["score"]) for r in rows], [int(r["label"]) for r in rows]
    assert res["image_auroc"] == pytest.approx(image_metrics(scores, labels)["image_auroc"], abs=1e-12)
    thr = res["threshold"]  # rank 0's threshold decided every rank's predictions
    assert [int(r["prediction"]) for r in rows] == [int(s > thr) for s in scores]


def test_ddp_continual_schedule(tmp_path):
    args = ["method=patchcore", "schedule=synthetic_3", "data.num_train=10", "data.num_test_normal=3",
            "data.num_test_anomalous=3", "data.size=32", "method.image_size=[32,32]", "method.batch_size=4",
            "output.heatmaps=0"]
    single, ddp = _single_and_ddp(tmp_path, args, ["trainer=ddp"])
    assert ddp["matrices"] == single["matrices"]
    assert [[e["num_test"] for e in p["evaluations"]] for p in ddp["per_task"]] == [[6], [6, 6], [6, 6, 6]]


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork", "ddp_notebook"])
def test_spawned_strategies_are_refused(strategy):
    from adtrain.strategy import resolve

    with pytest.raises(ConfigError, match="trainer.strategy.*use trainer=ddp"):
        resolve(strategy)


def test_plain_ddp_names_become_the_adtrain_strategy():
    from adtrain.strategy import AdtrainDDPStrategy, resolve

    assert isinstance(resolve("ddp"), AdtrainDDPStrategy)  # trainer.strategy=ddp, as a new user types it
    assert resolve("ddp_find_unused_parameters_true")._ddp_kwargs["find_unused_parameters"] is True
    assert resolve("auto") == "auto"


def test_by_index_drops_the_padding_repeats_and_restores_order():
    from adtrain.distributed import by_index

    # 5 samples on 2 ranks: the DistributedSampler pads rank 1 with sample 0 again
    rank0, rank1 = [(0, "a"), (2, "c"), (4, "e")], [(1, "b"), (3, "d"), (0, "a")]
    assert by_index([rank0, rank1]) == ["a", "b", "c", "d", "e"]


def test_rank_from_the_launchers_environment(monkeypatch):
    from adtrain.distributed import rank

    for key in ("RANK", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank() == 0  # a stray LOCAL_RANK without a world: a single run, which writes its files
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank() == 1  # a process Lightning's launcher started
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.delenv("WORLD_SIZE")
    assert rank() == 1  # rank 0 of another node, started by the user


def test_parameters_that_differ_across_ranks_fail_the_run(monkeypatch):
    from adtrain import distributed
    from adtrain.errors import TrainingError

    net = torch.nn.Linear(3, 2)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "all_gather_objects", lambda obj: [obj, dict(obj)])
    distributed.check_parameters_agree(net)  # equal on both "ranks": passes
    monkeypatch.setattr(distributed, "all_gather_objects", lambda obj: [obj, {**obj, "weight": obj["weight"] + 1}])
    with pytest.raises(TrainingError, match="parameters after fit"):
        distributed.check_parameters_agree(net)
