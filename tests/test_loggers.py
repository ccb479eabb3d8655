"""logger=wandb runs offline without an API key (and says so) and logs heatmaps, a score table,
per-epoch losses and the checkpoint; logger=none writes no logger files."""

import logging
import time

import pytest


def test_wandb_offline_logs_heatmaps_table_and_checkpoint(fast_cfg, tmp_path, monkeypatch, caplog):
    pytest.importorskip("wandb")
    from adtrain.run import run

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="adtrain"):
        res = run(fast_cfg("logger=wandb", "output.heatmaps=2", "trainer.max_epochs=2"), tmp_path)
    assert any("OFFLINE" in r.getMessage() for r in caplog.records)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    files = runs[0] / "files"
    images = list(files.rglob("media/images/**/*.png"))
    tables = list(files.rglob("media/table/**/*.table.json"))
    assert len(images) == 2 and len(tables) == 1
    keys = (b"test/image_auroc", b"train/loss", b"test/scores", b"model-")
    for _ in range(60):  # the W&B service may still be flushing its protobuf log of the run
        records = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
        if all(k in records for k in keys):
            break
        time.sleep(1)
    for key in keys:
        assert key in records, key
    assert res["image_auroc"] is not None
    # the run read back from its offline files: the resolved config, the test metrics, tags
    from tests.wandb_offline import read_run

    wb = read_run(runs[0])
    assert wb["config"]["method"]["_target_"] == "adtrain.methods.stfpm.Stfpm"
    assert wb["config"]["data"]["num_train"] == 24 and wb["config"]["trainer"]["max_epochs"] == 2
    assert "hydra" not in wb["config"]
    assert wb["history"]["test/image_auroc"] == pytest.approx(res["image_auroc"])
    assert wb["history"]["test/pixel_auroc"] == pytest.approx(res["pixel_auroc"])
    assert wb["history"]["test/at_threshold/recall"] == pytest.approx(res["test_at_threshold"]["recall"])
    for defect, value in res["image_auroc_by_defect"].items():
        assert wb["history"][f"test/image_auroc/{defect}"] == pytest.approx(value)
    assert {"stfpm", "synthetic", "schedule:single"} <= set(wb["tags"]) and wb["group"] is None
    assert wb["name"] == f"stfpm-synthetic-{res['category']}-seed0" and wb["exit_code"] == 0
    # a file still being written (cut anywhere) reads as a prefix of its records, never a parse error
    from tests.wandb_offline import records as wandb_records

    (log,) = runs[0].glob("*.wandb")
    whole = [r.SerializeToString() for r in wandb_records(log)]
    data = log.read_bytes()
    cut = tmp_path / "cut.wandb"
    for n in sorted({7, 100, 1000, len(data) // 3, len(data) // 2, len(data) - 5, len(data) - 1}):
        cut.write_bytes(data[:n])
        got = [r.SerializeToString() for r in wandb_records(cut)]
        assert got == whole[:len(got)] and len(got) <= len(whole)


def test_a_run_without_test_logs_its_selected_figures_and_checkpoint_to_wandb(fast_cfg, tmp_path, monkeypatch):
    """test=false (every Optuna trial): the W&B run still gets what the trial is judged on (the
    selected state's validation figures, under selected/*) and the checkpoint; no test/* key."""
    pytest.importorskip("wandb")
    from adtrain.run import run
    from tests.wandb_offline import read_run

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    res = run(fast_cfg("logger=wandb", "test=false", "method=patchcore"), tmp_path)
    assert res["image_auroc"] is None and res["val_image_auroc"] is not None
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    for _ in range(60):  # the W&B service may still be flushing
        wb = read_run(runs[0])
        if wb["exit_code"] is not None and b"model-" in b"".join(p.read_bytes() for p in runs[0].glob("*.wandb")):
            break
        time.sleep(1)
    assert wb["history"]["selected/val_image_auroc"] == pytest.approx(res["val_image_auroc"])
    assert wb["history"]["selected/threshold"] == pytest.approx(res["threshold"])
    assert not [k for k in wb["history"] if k.startswith("test/")]
    assert b"model-" in b"".join(p.read_bytes() for p in runs[0].glob("*.wandb")) and wb["exit_code"] == 0


def test_a_failed_run_is_not_finished_on_wandb(fast_cfg, tmp_path, monkeypatch):
    """The W&B run of a run that raised ends with exit code 1 (a failed sweep trial must not look
    finished after `wandb sync`)."""
    pytest.importorskip("wandb")
    import adtrain.run
    from adtrain.errors import TrainingError
    from tests.wandb_offline import read_run

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))

    def fail(*args, **kwargs):
        raise TrainingError("the loss is NaN")

    monkeypatch.setattr(adtrain.run, "fit_and_test", fail)
    with pytest.raises(TrainingError):
        adtrain.run.run(fast_cfg("logger=wandb"), tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    for _ in range(30):
        wb = read_run(runs[0])
        if wb["exit_code"] is not None:
            break
        time.sleep(1)
    assert wb["exit_code"] == 1


def test_wandb_group_is_the_sweep_or_the_continual_schedule(fast_cfg, monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from adtrain.loggers import default_group

    assert default_group(fast_cfg()) is None
    assert default_group(fast_cfg("data=synthetic", "schedule=synthetic_3")) == "synthetic_3-stfpm-synthetic"
    hydra = OmegaConf.create({"mode": "MULTIRUN", "sweep": {"dir": "multirun/stfpm/2026-01-01_00-00-00"}})
    from hydra.types import RunMode

    hydra.mode = RunMode.MULTIRUN
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hydra))
    assert default_group(fast_cfg("schedule=synthetic_3")) == "multirun/stfpm/2026-01-01_00-00-00"


def test_wandb_names_tell_a_sweeps_jobs_apart(fast_cfg, monkeypatch):
    """logger.name=null: <method>-<data>-<category>-seed<seed>, categories of one task joined by +,
    and -job<N> in a multirun (an Optuna study's trials differ in nothing else)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from adtrain.loggers import default_name

    assert default_name(fast_cfg("data=synthetic", "data.category=grid", "seed=3")) == "stfpm-synthetic-grid-seed3"
    assert default_name(fast_cfg("data=synthetic", "data.category=[grid,texture]")) == "stfpm-synthetic-grid+texture-seed0"
    # a continual run is named by its schedule, as its results.json's category (not the first task's data.category)
    assert default_name(fast_cfg("schedule=synthetic_3")) == "stfpm-synthetic-synthetic_3-seed0"
    hydra = OmegaConf.create({"mode": "MULTIRUN", "job": {"num": 7}})
    hydra.mode = RunMode.MULTIRUN
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hydra))
    assert default_name(fast_cfg("data=synthetic", "data.category=grid")) == "stfpm-synthetic-grid-seed0-job7"


def test_logger_none_writes_no_logger_files(fast_cfg, tmp_path):
    from adtrain.run import run

    run(fast_cfg("logger=none"), tmp_path)
    assert not (tmp_path / "csv").exists() and not (tmp_path / "wandb").exists()
    assert (tmp_path / "results.json").exists()


def test_a_continual_run_logs_its_final_heatmaps_scores_and_checkpoint_to_wandb(fast_cfg, tmp_path, monkeypatch):
    """A continual schedule's W&B run gets what a single run's does, for the final row: each task's
    test heatmaps, the per-image score table and the final checkpoint (beside the matrices)."""
    pytest.importorskip("wandb")
    from adtrain.run import run
    from tests.wandb_offline import read_run

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run(fast_cfg("logger=wandb", "method=patchcore", "schedule.tasks=[texture,grid]", "data.num_train=10",
                 "data.num_test_normal=3", "data.num_test_anomalous=3", "data.size=32", "method.image_size=[32,32]",
                 "method.batch_size=4", "output.heatmaps=1"), tmp_path)
    (wb_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    keys = (b"continual/heatmaps/texture", b"continual/heatmaps/grid", b"continual/scores", b"model-",
            b"continual/matrix/image_auroc")
    for _ in range(60):  # the W&B service may still be flushing
        logged = b"".join(p.read_bytes() for p in wb_dir.glob("*.wandb"))
        if all(k in logged for k in keys) and read_run(wb_dir)["exit_code"] is not None:
            break
        time.sleep(1)
    for key in keys:
        assert key in logged, key
    assert len(list((wb_dir / "files").rglob("media/images/**/*.png"))) >= 2  # one heatmap per task at least
    assert read_run(wb_dir)["exit_code"] == 0


@pytest.mark.parametrize("env, mode, named", [("", "auto", "WANDB_MODE=''"), ("onlin", "offline", "WANDB_MODE='onlin'"),
                                              (None, "ofline", "config key 'logger.mode'")])
def test_a_bad_wandb_mode_is_named_before_wandb_starts(monkeypatch, tmp_path, env, mode, named):
    """W&B itself rejects a bad WANDB_MODE (even an empty one) with a pydantic traceback from deep
    inside its settings; adtrain names the variable or the config key instead."""
    pytest.importorskip("wandb")
    from adtrain.errors import AdtrainError
    from adtrain.loggers import wandb_logger

    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    with pytest.raises(AdtrainError, match=named.replace("(", r"\(")):
        wandb_logger(mode=mode, save_dir=str(tmp_path))
    assert not (tmp_path / "wandb").exists()


def test_flags_and_names_are_not_logged_as_metrics():
    """A per-category `pixel_metrics_exact: true` became a metrics.csv column of True."""
    from adtrain.loggers import log_test_outputs

    class Logger:
        def log_metrics(self, scalars):
            self.scalars = scalars

        def save(self):
            pass

    logger = Logger()
    results = {"image_auroc": 0.9, "pixel_metrics_exact": True, "method": "stfpm",
               "test_at_threshold": {"recall": 0.5, "exact": False},
               "by_category": {"a": {"pixel_auroc": 0.8, "pixel_metrics_exact": True, "pixel_ap": None}}}
    log_test_outputs(logger, results, [], [], None)
    assert logger.scalars == {"test/image_auroc": 0.9, "test/at_threshold/recall": 0.5,
                              "test/by_category/a/pixel_auroc": 0.8}


@pytest.mark.parametrize("env, key, mode", [("offline", "x" * 40, "offline"), ("disabled", None, "disabled"),
                                            (None, "x" * 40, "online"), (None, None, "offline")])
def test_auto_mode_follows_wandb_mode(monkeypatch, tmp_path, env, key, mode):
    """WANDB_MODE=offline with an API key went online (a mode given to wandb.init beats the variable):
    a crash on a compute node without internet, an upload where offline was asked for."""
    pytest.importorskip("wandb")
    from adtrain.loggers import wandb_logger

    for name, value in (("WANDB_MODE", env), ("WANDB_API_KEY", key)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    logger = wandb_logger(mode="auto", save_dir=str(tmp_path))
    assert logger._wandb_init["mode"] == mode
