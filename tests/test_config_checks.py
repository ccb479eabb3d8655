"""A mistyped config value is refused before anything is read, trained or deleted, naming its key
(adtrain.preflight, adtrain.build, adtrain.backbones.extractor.layer_names, adtrain.data.transforms)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from adtrain.errors import ConfigError
from tests.conftest import FAST

ROOT = Path(__file__).resolve().parents[1]


def test_a_flag_given_a_word_leaves_a_finished_run_as_it_was(tmp_path):
    """overwrite=off is the string 'off' to Hydra (Python reads it as true): it once deleted a finished
    run and trained again. Refused now, naming the key; the run's files stay."""
    from adtrain.run import run
    from tests.conftest import compose

    run_dir = tmp_path / "run"
    run(compose(*FAST, "method=patchcore", "output.heatmaps=0"), run_dir)
    kept = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src"))
    p = subprocess.run([sys.executable, "-m", "adtrain", *FAST, "method=patchcore", "output.heatmaps=0",
                        f"hydra.run.dir={run_dir}", "overwrite=off"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "config key 'overwrite': must be true or false, got 'off'" in p.stderr, p.stderr[-2000:]
    assert {q: q.stat().st_mtime_ns for q in run_dir.rglob("*") if q.is_file()} == kept


@pytest.mark.parametrize("override, key, said", [
    ("overwrite=no", "overwrite", "must be true or false, got 'no'"),
    ("resume=off", "resume", "must be true or false"),
    ("test=no", "test", "must be true or false"),
    ("schedule.tasks=[texture,grid] schedule.joint=no", "schedule.joint", "must be true or false"),
    ("method=stfpm method.recalibrate_bn=off", "method.recalibrate_bn", "must be true or false"),
    ("trainer.max_epochs=null", "trainer.max_epochs", "1000 epochs"),
    ("trainer.limit_train_batches=0", "trainer.limit_train_batches", "nothing would train"),
    ("+trainer.max_steps=0", "trainer.max_steps", "nothing would train"),
    ("+trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches", ">= 1"),
    ("+trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch", ">= 1"),
    ("method=stfpm method.lr=-1", "method.lr", "number >= 0, got -1"),
    ("method=stfpm method.lr=abc", "method.lr", "number >= 0, got 'abc'"),
    ("method=stfpm method.momentum=2", "method.momentum", "[0, 1)"),
    ("method=cfa method.weight_decay=-1", "method.weight_decay", "number >= 0"),
    ("method=dfm method.lr_fmn=-1", "method.lr_fmn", "number >= 0, got -1"),
    ("trainer.accelerator=foo", "trainer.accelerator", "invalid accelerator name"),
    ("trainer.strategy=foo", "trainer.strategy", "invalid strategy name"),
    ("trainer.precision=foo", "trainer.precision", "is invalid"),
    ("trainer.devices=0", "trainer.devices", "devices=0"),
    ("output.heatmaps=abc", "output.heatmaps", "whole number >= 0"),
    ("output.heatmap_size=-5", "output.heatmap_size", "whole number >= 32"),
    ("method=stfpm selection.every_n_epochs=abc", "selection.every_n_epochs", "whole number >= 1"),
    ("method=stfpm method.val_every_n_epochs=0", "method.val_every_n_epochs", "whole number >= 1, got 0"),
    ("method=dfm method.start_confidence=abc", "method.start_confidence", "must be a number"),
    ("method=cfa selection.start_confidence=abc", "selection.start_confidence", "must be a number"),
    ("method=patchcore method.coreset_device=foo", "method.coreset_device", "auto, cpu or cuda"),
    ("method=patchcore method.coreset_device=cuda", "method.coreset_device", "no CUDA GPU"),
    ("data.augment=[{_target_:albumentations.NoSuchThing}]", "data.augment[0]", "albumentations.NoSuchThing"),
    # a value out of range: several lines naming `data`; a misspelt argument: a Python warning, the default
    # used; a _target_ that builds no transform: "expected a dict with '_target_'"
    ("data.augment=[{_target_:albumentations.HorizontalFlip,p:7}]", "data.augment[0]", "less than or equal to 1"),
    ("data.augment=[{_target_:albumentations.HorizontalFlip,p:0.5},{_target_:albumentations.HorizontalFlip,q:0.5}]",
     "data.augment[1]", "'q' are not valid"),
    ("data.augment=[{_target_:builtins.dict}]", "data.augment[0]", "not an albumentations transform"),
    # a transform that changes a training image's size: a batch of mixed shapes (traceback), or a model trained
    # at another size or orientation than it is tested at (PatchCore: validation AUROC 1.00 -> 0.75, no word)
    ("method.image_size=[64,96] data.augment=[{_target_:albumentations.RandomRotate90,p:0.5}]", "data.augment[0]",
     "RandomRotate90 turns the 64 x 96 training input"),
    ("method.image_size=[64,96] data.augment=[{_target_:albumentations.HorizontalFlip,p:0.5},"
     "{_target_:albumentations.Transpose,p:1.0}]", "data.augment[1]", "into 96 x 64"),
    ("data.augment=[{_target_:albumentations.RandomResizedCrop,size:[32,48]}]", "data.augment[0]", "into 32 x 48"),
    ("backbone.std=[0.2,0.2]", "backbone.std", "one per channel"),
    ("backbone.std=[0,0,0]", "backbone.std", "must be > 0"),
    ("backbone.mean=abc", "backbone.mean", "list of numbers"),
    ("method=dfm method.mem_chunk=0", "method.mem_chunk", "whole number >= 1"),
    ("method=hetmm method.lambdas=[0,0,0]", "method.lambdas", "at least one > 0"),
    ("method=cfa method.pool_size=4", "method.pool_size", "odd integer"),
    ("method=patchcore method.pool_size=2.5", "method.pool_size", "odd integer"),
    ("method=patchcore method.layers=layer2", "method.layers", "must be a list of stage names, e.g. [layer2]"),
    ("method=stfpm method.layers=[layer1,layer1]", "method.layers", "names a stage twice"),
    ("method=patchcore method.image_size=null", "method.image_size", "is null"),
    ("method=patchcore method.image_size=[64.5,64]", "method.image_size", "whole numbers"),
    ("trainer.limit_test_batches=0", "trainer.limit_test_batches", "test=false"),
    ("method=stfpm trainer.limit_val_batches=0", "trainer.limit_val_batches", "selection.monitor=last"),
    ("method=cfa method.alpha=-1", "method.alpha", "number >= 0, got -1"),
    ("method=patchcore method.blur_sigma=-1", "method.blur_sigma", "(0 = no blur)"),
    ("method=patchcore method.num_neighbors=1.5", "method.num_neighbors", "whole number >= 1, got 1.5"),
    ("method=dfm method.clip_grad_norm=-1", "method.clip_grad_norm", "number > 0"),
    ("method=dfm method.lambda_seg=-1", "method.lambda_seg", "number >= 0"),
    ("method=dfm method.num_keys=0", "method.num_keys", "whole number >= 1"),
    ("method=dfm method.rounds=0", "method.rounds", ">= 1, got 0"),
    ("method=dfm method.max_memory_features=0", "method.max_memory_features", ">= 1 or null"),
    ("method=dfm method.cutpaste.area_ratio=[0.5,0.1]", "method.cutpaste.area_ratio", "low <= high"),
    ("method=patchcore method.memory.nprobe=0", "method.memory.nprobe", ">= 1"),
    ("schedule.tasks=[]", "schedule.tasks", "non-empty list"),
    ("backbone.weights=/no/such.pth", "backbone.weights", "backbone.pretrained=true"),
    ("method=hetmm method.pts_positions=foo", "method.pts_positions", "per_position"),  # templates=all: unused yet checked
    ("logger=csv logger.save_dir=/proc/adtrain_no_such_dir", "logger.save_dir", "folder cannot be made: /proc/adtrain_no_such_dir"),
    ("method=stfpm data.synthetic_anomaly={_target_:adtrain.data.cutpaste.CutPaste,p:1.0}", "data.synthetic_anomaly",
     "as normal training images"),  # was learned as normal: image AUROC 0.94 -> 0.84
    ("method=dfm method.stage2_objective=supervised method.anomalies=data", "method.anomalies", "trains nothing"),
    ("data.category=[texture,texture]", "data.category", "names texture twice"),  # every split held it twice
    ("data.shots=1.5", "data.shots", "whole number >= 1 or null, got 1.5"),
    ("data.num_train=2.7", "data.num_train", "whole number >= 1"),
    ("data.val_anomalies.per_normal=1.5", "data.val_anomalies.per_normal", "whole number >= 0"),
    ("+data.val_anomalies.cutpaste.p=0.1", "data.val_anomalies.cutpaste.p", "per_normal"),  # was dropped
    ("+data.val_anomalies.cutpaste.area_ratio=[0.5,0.1]", "data.val_anomalies.cutpaste.area_ratio", "low <= high"),
    ("data.val_anomalies.cache_mb=abc", "data.val_anomalies.cache_mb", "number >= 0"),
    ("schedule.tasks=[texture,grid] schedule.replay=true", "schedule.replay", "got True"),  # was 1 image
    ("+trainer.fast_dev_run=true", "trainer.fast_dev_run", "debug=fdr"),
    ("trainer.precision=bf16-true", "trainer.precision", "bf16-mixed"),  # failed in the first conv
    ("trainer.precision=64", "trainer.precision", "(64-true) casts every weight"),
    ("schedule.tasks=[texture,grid] schedule.joint=true schedule.replay=2", "schedule.replay", "nothing to replay"),
    ("callbacks=[lr_monitor] logger=none", "callbacks.lr_monitor", "logger=csv"),
    ("+trainer.callbacks=[{_target_:lightning.pytorch.callbacks.LearningRateMonitor}] logger=none",
     "trainer.callbacks[0]", "logger=csv"),  # Lightning's traceback after the fit began
    ("method=stfpm callbacks=[early_stopping] data.val_anomalies=null", "callbacks.early_stopping.monitor",
     "needs validation anomalies"),  # failed after the first epoch
    ("callbacks=[early_stopping] callbacks.early_stopping.monitor=val/foo", "callbacks.early_stopping.monitor",
     "not a validation figure"),
    ("callbacks=[early_stopping] callbacks.early_stopping.mode=foo", "callbacks.early_stopping", "`mode` can be"),
    ("feature_cache=on feature_cache_max_gb=abc", "feature_cache_max_gb", "number > 0"),
    # a ViT's input a multiple of its patch size: timm's assertion inside the first forward pass, after the data
    ("method=dfm backbone=vit_small_patch16_224 backbone.pretrained=false method.layers=[block6] "
     "method.adapter_layers=[block5,block6] method.image_size=[63,63]", "method.image_size", "patch size 16, e.g. [64, 64]"),
    ("backbone=vit_small_patch16_224 backbone.pretrained=false method.layers=[block6] method.image_size=[80,80] "
     "method.center_crop=[70,64]", "method.center_crop", "multiple of its patch size 16"),
    ("backbone.name=nosuchmodel", "backbone.name", "unknown timm model"),  # named method.backbone.name
    # a schedule option on an ordinary run (no tasks): ignored without a word, a bad value too
    ("schedule.joint=true", "schedule.joint", "no schedule runs"),
    ("schedule.replay=-1", "schedule.replay", "no schedule runs"),
    ("+data.val_anomalies.by_category.txture.perlin.beta=[0.5,0.9]", "data.val_anomalies.by_category.txture",
     "names no category"),  # a misspelt category was left at the family's options
    ("+data.val_anomalies.by_category.texture.perlin.beta=[2,3]", "data.val_anomalies.by_category.texture.perlin.beta",
     ""),  # named where it is set, not under the family's own (valid) options
])
def test_a_wrong_value_is_refused_naming_its_key(fast_cfg, tmp_path, override, key, said):
    import torch

    from adtrain.run import run

    if "cuda" in override and torch.cuda.is_available():
        pytest.skip("a GPU is there: coreset_device=cuda is valid")
    with pytest.raises(ConfigError) as err:
        run(fast_cfg(*override.split()), tmp_path / "run")
    assert err.value.key == key and said in str(err.value), str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "results.json").exists()


def test_every_packaged_flag_is_checked_and_word_keys_are_not():
    """The flags come from the packaged YAML (config.yaml and the groups' options): a new true/false key
    is checked without being listed; feature_cache takes on | off words and trainer.deterministic
    Lightning's "warn": kept."""
    from adtrain.preflight import check_flags, flag_keys
    from tests.conftest import compose

    keys = flag_keys()
    assert {"overwrite", "resume", "test", "schedule.joint", "output.scores_csv", "trainer.inference_mode",
            "method.recalibrate_bn", "backbone.pretrained"} <= keys
    assert "feature_cache" not in keys and "trainer.deterministic" not in keys
    check_flags(compose(*FAST, "feature_cache=on", "trainer.deterministic=warn"))
    check_flags(compose(*FAST, "overwrite=true", "resume=False"))  # Hydra reads either spelling as a bool


def test_a_zero_learning_rate_is_allowed_and_said(caplog):
    from adtrain.preflight import check_config
    from tests.conftest import compose

    with caplog.at_level("WARNING", logger="adtrain"):
        check_config(compose(*FAST, "method=cfa", "method.lr=0"))
    assert "method.lr=0" in caplog.text


def test_by_category_check_takes_a_category_given_as_a_number():
    """BTAD's data.category=1 stands for folder "01" (and a schedule's tasks may be numbers): the
    by_category check read them as lists and raised a TypeError."""
    from adtrain.preflight import check_config
    from tests.conftest import compose

    check_config(compose("data=elpv", "data.category=1", "backbone.pretrained=false"))  # ELPV's packaged by_category.poly
    from omegaconf import open_dict

    cfg = compose("data=btad", "data.category=1", "schedule.tasks=[1,2]", "backbone.pretrained=false")
    with open_dict(cfg):
        cfg.data.val_anomalies.by_category = {"02": {"perlin": {"beta": [0.5, 0.9]}}}  # "02": not an override key
    check_config(cfg)

