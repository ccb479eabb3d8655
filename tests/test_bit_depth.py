"""data.bit_depth: 16-bit files whose values use fewer bits (a 12-bit camera's 0-4095), grey and
colour, read over their real range in training, testing, the image cache and adtrain.predict alike."""

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from adtrain.data.image_io import check_bit_depth, read_image
from adtrain.errors import ConfigError


def _expected(values: np.ndarray, bits: int | None) -> np.ndarray:
    top = 2 ** (bits or 16) - 1
    return np.round(np.minimum(values.astype(np.float64), top) * 255.0 / top).astype(np.uint8)


def _twelve_bit(shape, seed=0) -> np.ndarray:
    values = (np.random.default_rng(seed).random(shape) * 4096).astype(np.uint16)
    values.flat[0] = 5000  # above 12 bits: clipped to white at bit_depth=12
    return values


@pytest.mark.parametrize("fmt", ["png", "tif"])
def test_grey_16bit_files_read_at_their_bit_depth(tmp_path, fmt):
    values = _twelve_bit((20, 30))
    path = tmp_path / f"g.{fmt}"
    Image.fromarray(values).save(path) if fmt == "png" else tifffile.imwrite(path, values)
    for bits in (None, 12, 16):
        out = read_image(path, bits)
        assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
        assert (out == _expected(values, bits)[:, :, None]).all(), bits
    assert read_image(path).max() <= 20 and read_image(path, 12).max() == 255  # full range: nearly black


@pytest.mark.parametrize("fmt", ["png", "tif", "rgba.png"])
def test_colour_16bit_files_keep_their_16_bits(tmp_path, fmt):
    """Pillow decodes a 48-bit colour file as 8-bit RGB (each value's high byte), which no bit depth
    could rescale: such files are read through OpenCV, channel order and all."""
    values = _twelve_bit((16, 24, 3), seed=1)
    path = tmp_path / f"c.{fmt}"
    if fmt == "tif":
        tifffile.imwrite(path, values, photometric="rgb")
    elif fmt == "png":
        cv2.imwrite(str(path), values[:, :, ::-1])
    else:
        cv2.imwrite(str(path), np.dstack([values[:, :, ::-1], np.full(values.shape[:2], 65535, np.uint16)]))
    assert (read_image(path, 12) == _expected(values, 12)).all()
    assert (read_image(path) == _expected(values, None)).all()


def test_bad_bit_depths_name_the_key():
    assert check_bit_depth(None) is None and check_bit_depth(12) == 12
    for bad in (7, 17, "12", True, 12.0):
        with pytest.raises(ConfigError, match="data.bit_depth") as err:
            check_bit_depth(bad)
        assert err.value.key == "data.bit_depth"


def test_a_value_range_reads_16bit_32bit_and_float_images_over_it(tmp_path):
    """data.bit_depth=[low, high]: an X-ray's window of its 16-bit values, a thermal camera's kelvin:
    low..high read as 0..255, values outside clipped, on every image wider than 8 bits; 8-bit as stored."""
    window = (1000.0, 3000.0)
    grey = np.linspace(500, 3500, 48).astype(np.uint16).reshape(6, 8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    want = np.round((np.clip(grey.astype(np.float64), *window) - 1000) * 255 / 2000).astype(np.uint8)
    assert (read_image(tmp_path / "g.png", window) == want[:, :, None]).all()
    colour = np.dstack([grey, grey[::-1], grey[:, ::-1]])
    cv2.imwrite(str(tmp_path / "c.png"), colour[:, :, ::-1])
    want_c = np.round((np.clip(colour.astype(np.float64), *window) - 1000) * 255 / 2000).astype(np.uint8)
    assert (read_image(tmp_path / "c.png", window) == want_c).all()
    kelvin = (np.linspace(285, 315, 48, dtype=np.float32).reshape(6, 8))
    kelvin[0, 0] = np.nan  # a dead pixel: black, not a crash
    tifffile.imwrite(tmp_path / "k.tif", kelvin)
    out = read_image(tmp_path / "k.tif", (290, 310))[..., 0]
    ref = np.round((np.clip(np.nan_to_num(kelvin.astype(np.float64), nan=290), 290, 310) - 290) * 255 / 20)
    assert (out == ref.astype(np.uint8)).all() and out[0, 0] == 0 and out.max() == 255
    tifffile.imwrite(tmp_path / "i32.tif", grey.astype(np.int32))
    assert (read_image(tmp_path / "i32.tif", window)[..., 0] == want).all()
    eight = (np.arange(48, dtype=np.uint8) * 5).reshape(6, 8)
    Image.fromarray(eight).save(tmp_path / "e.png")
    assert (read_image(tmp_path / "e.png", window)[..., 0] == eight).all()
    assert check_bit_depth([290, 310]) == (290.0, 310.0) and check_bit_depth((0.5, 1)) == (0.5, 1.0)
    for bad in ([310, 290], [1, 1], [1], [0, "a"], [0, float("nan")], [True, 2]):
        with pytest.raises(ConfigError, match=r"data.bit_depth.*\[low, high\]"):
            check_bit_depth(bad)


def _tree(root: Path) -> None:
    """A folder dataset of 16-bit PNGs holding 12-bit values: normals dim noise, defects a bright square."""
    rng = np.random.default_rng(0)
    for folder, n, bright in (("good", 16, False), ("test_good", 4, False), ("bad/spot", 4, True)):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            img = (rng.random((48, 48)) * 600 + 1500).astype(np.uint16)
            if bright:
                img[10:24, 12:26] = 4000
            Image.fromarray(img).save(root / folder / f"{i:03d}.png")


def test_a_run_and_predict_read_12bit_files_alike(tmp_path, base_cfg):
    from adtrain.data.image_cache import cache_key
    from adtrain.predict import predict
    from adtrain.run import run
    from tests.conftest import FAST_BASE, compose

    _tree(tmp_path / "d")
    data = ["data=folder", f"data.normal_dir={tmp_path}/d/good", f"data.normal_test_dir={tmp_path}/d/test_good",
            f"data.abnormal_dir={tmp_path}/d/bad", "data.num_workers=0", f"paths.cache_dir={tmp_path}/cache"]
    res = run(base_cfg(*data, "method=patchcore", "data.bit_depth=12"), tmp_path / "run")
    assert res["image_auroc"] == 1.0  # the bright squares stand out once the 12 bits are read as such
    scores = {r["path"]: float(r["score"]) for r in csv.DictReader(open(tmp_path / "run" / "scores.csv"))}
    out = predict(str(tmp_path / "run" / "checkpoints" / "model.ckpt"), f"{tmp_path}/d/bad/spot", heatmaps=False,
                  out=str(tmp_path / "pred"))
    for row in csv.DictReader(open(out / "predictions.csv")):
        assert float(row["score"]) == pytest.approx(scores[row["path"]], rel=1e-5)
    # the image cache keeps the two readings apart
    from adtrain.build import _instantiate

    keys = set()
    for bits in ("null", "12"):
        dm = _instantiate(compose(*FAST_BASE, *data, "method=patchcore", f"data.bit_depth={bits}").data, "data",
                          drop=("name",))
        dm.setup()
        keys.add(cache_key(dm.train_samples, dm.sample_loader(), dm.image_size, dm.resize))
    assert len(keys) == 2


def test_a_thermal_dataset_in_kelvin_runs_and_predicts_over_its_range(tmp_path, base_cfg):
    """Float TIFFs in kelvin: refused without a range (never clipped to white), read over
    data.bit_depth=[290,310] by the run, the image cache and predict alike."""
    from adtrain.data.image_cache import cache_key
    from adtrain.errors import DataError
    from adtrain.predict import predict
    from adtrain.run import run
    from tests.conftest import FAST_BASE, compose

    rng = np.random.default_rng(0)
    root = tmp_path / "thermal"
    for folder, n, hot in (("good", 16, False), ("test_good", 4, False), ("bad/hot", 4, True)):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            frame = (295 + rng.random((48, 48)) * 4).astype(np.float32)
            if hot:
                frame[10:24, 12:26] = 308.5
            tifffile.imwrite(root / folder / f"{i:03d}.tif", frame)
    data = ["data=folder", f"data.normal_dir={root}/good", f"data.normal_test_dir={root}/test_good",
            f"data.abnormal_dir={root}/bad", "data.num_workers=0", f"paths.cache_dir={tmp_path}/cache"]
    with pytest.raises(DataError, match="cannot read image: a 32-bit float image with values from 29"):
        run(base_cfg(*data, "method=patchcore"), tmp_path / "refused")
    res = run(base_cfg(*data, "method=patchcore", "data.bit_depth=[290,310]"), tmp_path / "run")
    assert res["image_auroc"] == 1.0
    scores = {r["path"]: float(r["score"]) for r in csv.DictReader(open(tmp_path / "run" / "scores.csv"))}
    out = predict(str(tmp_path / "run" / "checkpoints" / "model.ckpt"), f"{root}/bad/hot", heatmaps=False,
                  out=str(tmp_path / "pred"))
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 4 and all(float(r["score"]) == pytest.approx(scores[r["path"]], rel=1e-5) for r in rows)
    from adtrain.build import _instantiate

    keys = set()
    for window in ("[290,310]", "[280,320]"):  # the image cache keeps the two readings apart
        dm = _instantiate(compose(*FAST_BASE, *data, "method=patchcore", f"data.bit_depth={window}").data, "data",
                          drop=("name",))
        dm.setup()
        keys.add(cache_key(dm.train_samples, dm.sample_loader(), dm.image_size, dm.resize))
    assert len(keys) == 2


def test_a_16bit_colour_mask_keeps_a_defect_of_value_one(tmp_path):
    """Pillow keeps a 48-bit file's high bytes: a mask drawn with value 1 would read as empty."""
    from adtrain.data.image_io import read_mask

    mask = np.zeros((12, 16, 3), np.uint16)
    mask[2:5, 3:9] = 1
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    out = read_mask(tmp_path / "m.png", (16, 12))
    assert out.sum() == 18 and out[2:5, 3:9].all()


def test_exports_carry_the_bit_depth_in_their_preprocessing():
    """An export's metadata holds data.bit_depth (Detector reads files with it before the uint8
    graph); an export made before the field reads as full range; a corrupt value is named."""
    from adtrain.inference.graph import Preprocessing

    pre = Preprocessing((64, 64), None, (0.5,) * 3, (0.5,) * 3, "pil_bilinear", 12)
    assert pre.to_dict()["bit_depth"] == 12 and Preprocessing.from_dict(pre.to_dict()) == pre
    older = {k: v for k, v in pre.to_dict().items() if k != "bit_depth"}
    assert Preprocessing.from_dict(older).bit_depth is None
    with pytest.raises(ConfigError, match="preprocessing.bit_depth"):
        Preprocessing.from_dict({**pre.to_dict(), "bit_depth": 40})
    windowed = Preprocessing((64, 64), None, (0.5,) * 3, (0.5,) * 3, "pil_bilinear", (290.0, 310.0))
    assert json.loads(json.dumps(windowed.to_dict()))["bit_depth"] == [290.0, 310.0]
    assert Preprocessing.from_dict(json.loads(json.dumps(windowed.to_dict()))) == windowed


def test_is_wide_from_the_header_alone_and_a_range_on_8bit_training_images_is_warned_about(tmp_path, caplog):
    """data.bit_depth=[low, high] reads images wider than 8 bits over the range; 8-bit ones stay as
    stored. The pre-flight tells wide from 8-bit by the header (a 48-bit colour PNG opens as PIL's
    'RGB' too) and warns, naming them, when a range is set but training images are 8-bit."""
    import logging

    from adtrain.data.file_checks import header_info, warn_range_unused

    values = _twelve_bit((16, 24, 3), seed=2)
    cv2.imwrite(str(tmp_path / "wide_colour.png"), values[:, :, ::-1])
    Image.fromarray(values[:, :, 0]).save(tmp_path / "wide_grey.png")
    tifffile.imwrite(tmp_path / "float.tif", values[:, :, 0].astype(np.float32))
    Image.fromarray((values[:, :, 0] >> 4).astype(np.uint8)).save(tmp_path / "grey8.png")
    Image.fromarray((values >> 4).astype(np.uint8)).save(tmp_path / "colour8.jpg")
    names = ["wide_colour.png", "wide_grey.png", "float.tif", "grey8.png", "colour8.jpg"]
    infos = [header_info(tmp_path / n) for n in names]
    assert [w for _, w in infos] == [True, True, True, False, False]
    assert all(size == (24, 16) for size, _ in infos)
    paths = [tmp_path / n for n in names]
    with caplog.at_level(logging.WARNING, logger="adtrain"):
        assert warn_range_unused([w for _, w in infos], paths, (100.0, 3000.0)) == paths[3:]
        assert warn_range_unused([w for _, w in infos], paths, 12) == []  # bits: nothing to warn about
        assert warn_range_unused([True, True], paths[:2], (100.0, 3000.0)) == []
    assert len(caplog.records) == 1
    text = caplog.records[0].getMessage()
    assert "2 of the 5 training images are 8-bit" in text and "grey8.png" in text and "[100, 3000]" in text
