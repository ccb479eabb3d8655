"""Fault injection (issue 11): bad input (damaged files, bad config values, impossible folders or devices)
fails before training, in one line naming the file or the key."""

import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from adtrain.errors import ConfigError, DataError
from tests.conftest import FAST
from tests.reliability import _cli, _one_line_error, _never_trains


# ---------------------------------------------------------------------------------------- bad input, before training
@pytest.fixture
def mvtec(tmp_path):
    from adtrain.data.testing import write_mvtec_tree

    return write_mvtec_tree(tmp_path / "mvtec", n_train=8, n_test_good=2, defects={"crack": 2}, size=48)


def _mvtec_cfg(base_cfg, root, *over):
    return base_cfg("data=mvtec", f"data.root={root}", "data.category=widget", "data.num_workers=0", *over)


@pytest.mark.parametrize("damage", ["corrupt", "zero_bytes", "mask_size", "cut_short", "mask_cut_short"])
def test_bad_test_files_fail_before_training(base_cfg, mvtec, tmp_path, monkeypatch, damage):
    from adtrain.run import run

    _never_trains(monkeypatch)
    test_image = mvtec / "widget" / "test" / "crack" / "001.png"
    bad = test_image
    if damage == "corrupt":
        test_image.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image at all")
    elif damage == "zero_bytes":
        test_image.write_bytes(b"")
    elif damage == "cut_short":  # a copy that stopped: the header is whole, the pixels are not
        data = test_image.read_bytes()
        test_image.write_bytes(data[:len(data) // 2])
    else:
        bad = mvtec / "widget" / "ground_truth" / "crack" / "001_mask.png"
        if damage == "mask_size":
            Image.fromarray(np.zeros((40, 48), np.uint8)).save(bad)
        else:
            data = bad.read_bytes()
            bad.write_bytes(data[:len(data) // 2])
    want = {"corrupt": "not a readable image", "zero_bytes": r"empty file \(0 bytes\)",
            "mask_size": "mask size 48x40 differs from image", "cut_short": "cannot read image: OSError",
            "mask_cut_short": "cannot read image: OSError"}[damage]
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
    ("method.center_crop=[300,300]", "method.center_crop", "is larger than image_size"),  # data's is ${method...}
    ("data.center_crop=[300,300]", "data.center_crop", "is larger than image_size"),
    ("method.image_size=[0,0]", "method.image_size", "sizes must be positive"),
    ("+data.bit_depth=[310,290]", "data.bit_depth", "low < high"),
    ("+data.bit_depth=20", "data.bit_depth", "from 8 to 16"),
])
def test_bad_config_values_fail_before_anything_is_written(fast_cfg, tmp_path, over, key, words):
    from adtrain.run import run

    with pytest.raises(ConfigError, match=key) as err:
        run(fast_cfg(over), tmp_path / "run")
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method, over, key", [
    ("patchcore", "method.coreset_ratio=2", "method.coreset_ratio"),
    ("patchcore", "method.embed_dims=[1024]", "method.embed_dims"),  # pre-flight: nothing written
    ("cfa", "method.gamma_c=0", "method.gamma_c"),
    ("stfpm", "method.image_size=[0,0]", "method.image_size"),  # data.image_size is ${method.image_size}
])
def test_a_constructor_s_bad_argument_is_named_where_it_is_set(fast_cfg, tmp_path, method, over, key):
    """The constructor knows its argument as coreset_ratio; the user sets method.coreset_ratio."""
    from adtrain.run import run

    with pytest.raises(ConfigError) as err:
        run(fast_cfg(f"method={method}", over), tmp_path / "run")
    assert str(err.value).startswith(f"config key '{key}': ") and err.value.key == key
    if key == "method.embed_dims":
        assert not (tmp_path / "run").exists()


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
