"""The config groups of the lightning-hydra-template kind: callbacks/, debug/, experiment/, paths/,
an optional local/ override, print_config; `+trainer.callbacks` without the clash with adtrain's own
callbacks; the internal HETMM parameters not listed as a group."""

import csv
import json
import shutil
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from adtrain.errors import ConfigError
from tests.conftest import CONF, FAST, compose

MVTEC = ["bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
         "tile", "toothbrush", "transistor", "wood", "zipper"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose_hydra(*overrides, conf=CONF):
    from hydra import compose as hc
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return hc("config", overrides=list(overrides), return_hydra_config=True)


# ---------------------------------------------------------------- callbacks


@pytest.mark.parametrize("option", ["rich_progress_bar", "early_stopping", "lr_monitor", "model_summary"])
def test_each_callback_option_composes_and_builds(option):
    from adtrain.build import build_callbacks

    cfg = compose(f"callbacks=[{option}]")
    assert list(cfg.callbacks) == [option]
    (cb,) = build_callbacks(cfg)
    assert type(cb).__name__ == cfg.callbacks[option]._target_.rsplit(".", 1)[1]
    if option == "rich_progress_bar":
        assert cfg.trainer.enable_progress_bar is True
    if option == "model_summary":
        assert cfg.trainer.enable_model_summary is True


def test_default_callbacks_add_nothing_and_options_combine():
    from adtrain.build import build_callbacks

    assert _options("callbacks") == ["default", "early_stopping", "lr_monitor", "model_summary", "rich_progress_bar"]
    assert build_callbacks(compose(*FAST)) == []
    cfg = compose(*FAST, "callbacks=[early_stopping,lr_monitor]", "callbacks.early_stopping=null")
    assert [type(c).__name__ for c in build_callbacks(cfg)] == ["LearningRateMonitor"]


def test_callback_errors_name_the_key():
    from adtrain.build import build_callbacks

    cfg = compose(*FAST, "+callbacks.bad={_target_: lightning.pytorch.callbacks.EarlyStopping, nope: 1}")
    with pytest.raises(ConfigError, match="callbacks.bad"):
        build_callbacks(cfg)
    with pytest.raises(ConfigError, match="trainer.callbacks.0"):
        build_callbacks(compose(*FAST), ["early_stopping"])
    with pytest.raises(ConfigError, match="callbacks.x"):
        build_callbacks(compose(*FAST, "+callbacks.x=3"))


def test_contradicting_callback_and_trainer_flag_is_a_config_error(tmp_path):
    from adtrain.build import build_trainer

    cfg = compose(*FAST, "callbacks=[rich_progress_bar]", "trainer.enable_progress_bar=false")
    with pytest.raises(ConfigError, match="config key 'trainer.enable_progress_bar': .*RichProgressBar"):
        build_trainer(cfg, tmp_path, None)


def test_trainer_callbacks_join_adtrains_own(fast_cfg, tmp_path):
    """`+trainer.callbacks=[...]` used to fail: "got multiple values for keyword argument 'callbacks'"."""
    from adtrain.build import build_trainer

    cfg = fast_cfg("+trainer.callbacks=[{_target_: lightning.pytorch.callbacks.LearningRateMonitor}]",
                   "callbacks=[early_stopping]")
    trainer, _ = build_trainer(cfg, tmp_path, None)
    names = [type(c).__name__ for c in trainer.callbacks]
    assert {"ModelCheckpoint", "RunState", "LearningRateMonitor", "EarlyStopping"} <= set(names), names


# ---------------------------------------------------------------- debug, paths, experiment, local


@pytest.mark.parametrize("option", ["default", "fdr", "overfit", "limit", "profiler"])
def test_each_debug_option_composes(option):
    cfg = _compose_hydra(*FAST, f"debug={option}")
    assert cfg.trainer.accelerator == "cpu" and cfg.data.num_workers == 0
    assert "/debug/" in cfg.hydra.run.dir
    expected = {"fdr": ("limit_train_batches", 1), "overfit": ("overfit_batches", 1),
                "limit": ("limit_train_batches", 8), "profiler": ("profiler", None)}.get(option)
    if expected and expected[1] is not None:
        assert cfg.trainer[expected[0]] == expected[1]
    if option == "profiler":
        assert cfg.trainer.profiler._target_.endswith("SimpleProfiler")


def test_paths_place_runs_sweeps_and_data():
    cfg = _compose_hydra("data=mvtec", "paths.output_dir=/scratch/runs", "paths.sweep_dir=/scratch/sweeps",
                         "paths.data_dir=/datasets")
    assert cfg.hydra.run.dir.startswith("/scratch/runs/stfpm/mvtec/")
    assert cfg.hydra.sweep.dir.startswith("/scratch/sweeps/stfpm/")
    if "MVTEC_ROOT" not in __import__("os").environ:
        assert cfg.data.root == "/datasets/mvtec"


@pytest.mark.parametrize("name", ["stfpm_mvtec", "patchcore_mvtec", "cfa_mvtec", "hetmm_mvtec", "dfm_mvtec",
                                  "patchcore_official_mvtec"])
def test_paper_experiments_cover_mvtec_with_the_methods_recipe(name):
    cfg = _compose_hydra(f"experiment={name}")
    method = name.split("_")[0]
    assert cfg.method.name == method and cfg.data.name == "mvtec" and cfg.schedule.tasks is None
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert str(cfg.hydra.sweeper.params["data.category"]).split(",") == MVTEC
    paper_backbone = {"stfpm": "resnet18", "patchcore": "wide_resnet50_2", "cfa": "wide_resnet50_2",
                      "hetmm": "wide_resnet101_2", "dfm": "efficientnet_lite0"}[method]
    assert paper_backbone in cfg.backbone.name
    plain = compose(f"method={method}")  # the experiment pins the method config's recipe...
    paper = {"dfm_mvtec": {"rounds": 2, "stage1_epochs": 3, "max_epochs": 16, "lr_fmn": 5e-3,
                           "stage2_objective": "supervised", "selection": "val_image_auroc_perlin",
                           "train_modulates": True},
             "patchcore_official_mvtec": {"embed_dims": [1024, 1024], "num_neighbors": 1,  # the official code's
                                          "squared_scores": True},
             }.get(name, {})  # ...or the paper's (or the official code's), where they differ
    for key, value in cfg.method.items():
        if key not in ("backbone",):
            assert paper.get(key, plain.method[key]) == value, key
    assert all(plain.method[key] != value for key, value in paper.items())
    assert set(_options("experiment")) >= {name, "ucad_mvtec_dfm"}


def test_dfm_cfa_is_dfm_over_cfa_with_stage_1_on():
    from omegaconf import OmegaConf

    from adtrain.build import build_method

    cfg = compose("method=dfm_cfa")
    plain = compose("method=dfm", "method.host=cfa", "method.stage1_epochs=3", "method.max_epochs=8")
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(plain)
    assert cfg.method.name == "dfm" and cfg.trainer.max_epochs == 8
    cfg.backbone.pretrained = False
    m = build_method(cfg)
    assert m.model.host == "cfa" and (m.rounds, m.e1, m.e2) == (1, 3, 5) and m.stage == 1


def test_ucad_experiment_is_the_15_class_continual_schedule():
    cfg = _compose_hydra("experiment=ucad_mvtec_dfm")
    assert cfg.method.name == "dfm" and cfg.data.name == "mvtec"
    assert list(cfg.schedule.tasks) == MVTEC and cfg.schedule.joint is False and cfg.schedule.replay == 0
    assert cfg.hydra.mode is None or cfg.hydra.mode.name != "MULTIRUN"
    from adtrain.build import build_method

    for method in ("dfm", "patchcore"):  # the protocol's run and its baseline (README): both build
        cfg = OmegaConf.to_container(_compose_hydra("experiment=ucad_mvtec_dfm", f"method={method}"), resolve=False)
        cfg.pop("hydra")
        cfg = OmegaConf.create(cfg)
        cfg.backbone.pretrained = False
        assert type(build_method(cfg)).__name__.lower() == method
    assert cfg.method.name == "patchcore" and list(cfg.schedule.tasks) == MVTEC
    assert _compose_hydra("experiment=ucad_mvtec_dfm").method.num_keys == 196  # UCAD's 196 keys per task


def test_elpv_mono_poly_dfm_is_dfm_sized_and_routed_like_per_task_patchcore():
    from adtrain.build import build_method

    cfg = _compose_hydra("experiment=elpv_mono_poly_dfm")
    plain = _compose_hydra("method=dfm", "data=elpv", "schedule=elpv_mono_poly")
    assert cfg.data.name == "elpv" and list(cfg.schedule.tasks) == ["mono", "poly"]
    patchcore = compose("method=patchcore")
    assert cfg.method.memory_size is None and cfg.method.coreset_ratio == patchcore.method.coreset_ratio
    assert list(cfg.method.image_size) == [256, 256] and cfg.data.image_size == [256, 256]
    assert (cfg.method.task_routing, cfg.method.task_score_norm) == ("score", "none")
    changed = {k for k in cfg.method if k != "backbone" and cfg.method[k] != plain.method[k]}
    assert changed == {"memory_size", "image_size", "task_routing", "task_score_norm"}  # the named deviations only
    cfg = OmegaConf.to_container(cfg, resolve=False)
    cfg.pop("hydra")
    cfg = OmegaConf.create(cfg)
    cfg.backbone.pretrained = False
    m = build_method(cfg)
    assert (m.task_routing, m.task_score_norm) == ("score", "none")


def test_local_overrides_are_optional_and_apply_when_present(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf, ignore=shutil.ignore_patterns("local"))
    assert compose_dir(conf).paths.output_dir == "outputs"  # none there: composes all the same
    (conf / "local").mkdir()
    (conf / "local" / "default.yaml").write_text("# @package _global_\npaths:\n  data_dir: /mnt/data\nseed: 5\n")
    cfg = compose_dir(conf, "data=mvtec")
    assert cfg.paths.data_dir == "/mnt/data" and cfg.seed == 5
    assert compose_dir(conf, "seed=1").seed == 1  # the command line still wins
    # an installed wheel: the same local/ folder anywhere, added to Hydra's search path
    mine = tmp_path / "mine"
    shutil.copytree(conf / "local", mine / "local")
    assert _compose_hydra(f"hydra.searchpath=[file://{mine}]").seed == 5


def compose_dir(conf, *overrides):
    return _compose_hydra(*overrides, conf=conf)


def test_help_lists_user_groups_only(tmp_path):
    p = subprocess.run([sys.executable, "-m", "adtrain", "--help"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    groups = p.stdout.split("== Config ==")[0]
    for group in ("callbacks:", "debug:", "experiment:", "paths:", "method:", "logger:"):
        assert group in groups
    assert "\nparams:" not in groups
    assert not (CONF / "params").exists()


def test_print_config_tree(fast_cfg, capsys):
    import io

    from adtrain.config_tree import print_config_tree

    buf = io.StringIO()
    print_config_tree(fast_cfg("callbacks=[lr_monitor]"), file=buf)
    text = buf.getvalue()
    assert text.index("data") < text.index("method") < text.index("callbacks")
    assert "LearningRateMonitor" in text and "resnet18" in text


# ---------------------------------------------------------------- a tiny run


def test_tiny_run_with_callbacks_and_debug_options(tmp_path):
    """A whole run with debug=fdr (one batch of each set), early stopping and an LR monitor: every
    file of a run is written and the LR is in the CSV log (the CLI path: tests/test_wheel.py)."""
    from adtrain.run import run

    cfg = compose(*FAST, "data.num_train=16", "data.size=64", "callbacks=[early_stopping,lr_monitor]", "debug=fdr",
                  "logger=csv", "trainer.max_epochs=2", "method.val_every_n_epochs=1")
    assert cfg.trainer.limit_train_batches == 1 and cfg.trainer.detect_anomaly is True
    res = run(cfg, tmp_path / "run")
    run_dir = tmp_path / "run"
    assert res["epochs_trained"] >= 1 and res["num_test"] == 8  # limit_test_batches=1: one batch of 8
    assert json.loads((run_dir / "results.json").read_text())["num_test"] == 8
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    assert any(r.get("lr-SGD") not in (None, "") and float(r["lr-SGD"]) == pytest.approx(0.4) for r in rows)
    # the validation figures are logged as the selection recorded them (as float32 this run's
    # 0.5308812733508368 was 0.5308812856674194 in metrics.csv)
    logged = [float(r["val/pixel_auroc"]) for r in rows if r.get("val/pixel_auroc")]
    assert logged and logged == [h["metrics"]["val/pixel_auroc"] for h in res["selection"]["history"]]
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.trainer.limit_train_batches == 1 and "early_stopping" in saved.callbacks


def test_print_config_at_start_of_main(fast_cfg, monkeypatch, capsys):
    import adtrain.run
    from adtrain.__main__ import main

    monkeypatch.setattr(adtrain.run, "run", lambda cfg: {"val_image_auroc": 0.5})
    main(fast_cfg("print_config=true"))
    assert "CONFIG" in capsys.readouterr().out
    main(fast_cfg())
    assert "CONFIG" not in capsys.readouterr().out


@pytest.mark.parametrize("module, words", [("adtrain.predict", "checkpoint=RUN/checkpoints/model.ckpt images="),
                                           ("adtrain.export", "[format=onnx|torchscript|openvino]"),
                                           ("adtrain.templates", "add checkpoint="),
                                           ("adtrain.bench", "bench.run_dir=DIR")])
def test_each_small_command_answers_help_with_its_usage(module, words, capsys):
    """--help used to be refused as an unknown option (or a traceback from adtrain.bench)."""
    import importlib

    mod = importlib.import_module(module)
    for flag in ("--help", "-h"):
        if module == "adtrain.bench":  # the console script reads sys.argv
            _with_argv(mod.cli, flag)
        else:
            mod.main([flag])
        out = capsys.readouterr().out
        assert words in out and out.startswith(mod.__doc__.strip().splitlines()[0])


def _with_argv(fn, *args):
    import sys
    from unittest import mock

    with mock.patch.object(sys, "argv", ["adtrain-bench", *args]):
        return fn()


def test_a_bad_bench_override_ends_in_one_line(capsys):
    from adtrain.bench import cli

    with pytest.raises(SystemExit) as ex:
        _with_argv(cli, "nosuch=1")
    err = capsys.readouterr().err
    assert ex.value.code == 2 and err.startswith("adtrain-bench: error: ") and "Traceback" not in err


@pytest.mark.parametrize("arg, words", [("bench.outt=x.json", "'bench.outt': unknown benchmark option"),
                                        ("bench.out", "'bench.out': needs a value"),
                                        ("bench.model_only=yes", "'bench.model_only': must be true or false"),
                                        # a traceback after the whole run, before
                                        ("bench.out=/dev/null/x.json", "'bench.out': the figures' folder cannot be made"),
                                        ("bench.out=/", "'bench.out': / is a folder"),
                                        # a schedule: KeyError after every task had run; hydra.run.dir: ignored
                                        ("schedule=synthetic_3", "'schedule': adtrain.bench times one run"),
                                        ("hydra.run.dir=/tmp/x", "'hydra.run.dir': is not read by adtrain.bench")])
def test_a_bad_bench_option_is_refused_before_the_run(arg, words, capsys):
    """A misspelt bench.* option used to be ignored: the run went on (minutes) without it."""
    from unittest import mock

    from adtrain import bench

    with mock.patch("adtrain.run.run", side_effect=AssertionError("the run started")), pytest.raises(SystemExit) as ex:
        _with_argv(bench.cli, "method=patchcore", arg)
    err = capsys.readouterr().err
    assert ex.value.code == 2 and words in err and "Traceback" not in err
