"""DRAEM-style Perlin anomalies (adtrain.data.perlin): noise, masks, textures, config errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from adtrain.data.perlin import PerlinAnomaly, PerlinConfig, perlin_noise
from adtrain.errors import ConfigError


def _image(h=96, w=128, seed=0, gray=False):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (100 + 40 * np.sin(xx / 7.0) + 20 * np.cos(yy / 5.0))[..., None]
    img = base + (0 if gray else np.array([20.0, -10.0, 5.0])) + rng.normal(0, 3, (h, w, 1 if gray else 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    return np.repeat(img, 3, axis=2) if gray else img


# ------------------------------------------------------------------------ noise
def test_noise_range_shape_dtype_and_determinism():
    for res, angle in [((1, 1), 0.0), ((4, 8), 30.0), ((32, 2), -90.0), ((3.5, 5), 45.0)]:
        n = perlin_noise((64, 80), res, np.random.default_rng(1), angle=angle)
        assert n.shape == (64, 80) and n.dtype == np.float32
        assert np.all(np.isfinite(n))
        assert n.min() >= -1.0 - 1e-5 and n.max() <= 1.0 + 1e-5
        np.testing.assert_array_equal(n, perlin_noise((64, 80), res, np.random.default_rng(1), angle=angle))
    big = perlin_noise((256, 256), (8, 8), np.random.default_rng(0))
    assert big.max() > 0.4 and big.min() < -0.4  # not degenerate
    assert abs(float(big.mean())) < 0.15
    # smooth, not white noise
    assert np.abs(np.diff(big, axis=1)).mean() < 0.1


def test_noise_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        perlin_noise((0, 10), (1, 1), rng)
    with pytest.raises(ValueError):
        perlin_noise((10, 10), (0, 1), rng)


# ------------------------------------------------------------------------ the hook
def test_deterministic_for_a_seed():
    aug = PerlinAnomaly()
    img = _image()
    for seed in range(5):
        a_img, a_mask = aug(img, np.random.default_rng(seed))
        b_img, b_mask = aug(img, np.random.default_rng(seed))
        np.testing.assert_array_equal(a_img, b_img)
        np.testing.assert_array_equal(a_mask, b_mask)


def test_dtype_shape_mask_area_and_outside_unchanged():
    aug = PerlinAnomaly()
    lo, hi = aug.config.area_ratio
    diffs = []
    for seed in range(30):
        img = _image(seed=seed)
        before = img.copy()
        out, mask = aug(img, np.random.default_rng(seed))
        np.testing.assert_array_equal(img, before)  # input not modified in place
        assert out.dtype == np.uint8 and out.shape == img.shape
        assert mask.dtype == np.uint8 and mask.shape == img.shape[:2]
        assert set(np.unique(mask)) <= {0, 1}
        assert mask.any()
        assert lo <= mask.mean() <= hi
        m = mask.astype(bool)
        np.testing.assert_array_equal(out[~m], img[~m])
        diffs.append(np.abs(out[m].astype(np.int16) - img[m]).mean())
    assert np.mean(diffs) > 15  # the texture really changes the masked pixels


def test_different_seeds_give_different_masks():
    aug = PerlinAnomaly()
    img = _image()
    masks = [aug(img, np.random.default_rng(s))[1] for s in range(6)]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert not np.array_equal(masks[i], masks[j])


def test_mask_never_empty_with_impossible_area_range():
    # high threshold: most draws are empty; a tight range far from the draws forces fallbacks
    aug = PerlinAnomaly(threshold=0.99, max_tries=2, area_ratio=(0.2, 0.25))
    for seed in range(10):
        out, mask = aug(_image(48, 40), np.random.default_rng(seed))
        assert mask.any() and out.shape == (48, 40, 3)
    # every draw empty -> the ellipse, sized within the area range
    aug = PerlinAnomaly(threshold=0.999999, max_tries=1, area_ratio=(0.05, 0.1))
    for seed in range(10):
        mask = aug.sample_mask((100, 120), np.random.default_rng(seed))
        assert 0.03 <= mask.mean() <= 0.12


def test_p_zero_and_grayscale_input():
    img = _image()
    out, mask = PerlinAnomaly(p=0.0)(img, np.random.default_rng(0))
    np.testing.assert_array_equal(out, img)
    assert not mask.any() and mask.dtype == np.uint8
    out, mask = PerlinAnomaly()(img[..., 0], np.random.default_rng(0))  # (H, W) input
    assert out.shape == img.shape and mask.any()


def test_p_fraction():
    aug = PerlinAnomaly(p=0.5)
    img = _image(32, 32)
    hits = sum(aug(img, np.random.default_rng(s))[1].any() for s in range(200))
    assert 70 <= hits <= 130


def test_gray_images_get_gray_texture():
    img = _image(gray=True)
    for seed in range(8):
        out, mask = PerlinAnomaly()(img, np.random.default_rng(seed))
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    coloured = 0
    for seed in range(8):
        out, _ = PerlinAnomaly(match_gray=False)(img, np.random.default_rng(seed))
        coloured += not np.array_equal(out[..., 0], out[..., 1])
    assert coloured >= 6


def test_procedural_textures_vary():
    aug = PerlinAnomaly()
    texs = [aug.sample_texture((64, 64), np.random.default_rng(s)) for s in range(12)]
    for t in texs:
        assert t.shape == (64, 64, 3) and t.dtype == np.uint8
    assert np.mean([t.std() for t in texs]) > 15  # not flat
    means = np.array([t.reshape(-1, 3).mean(0) for t in texs])
    assert means.std(0).mean() > 15  # different colours across draws


def test_texture_dir(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    sub = tmp_path / "textures" / "banded"  # DTD layout: images/<class>/<file>
    sub.mkdir(parents=True)
    for i, c in enumerate(colours):
        arr = np.zeros((40 + 10 * i, 30 + 5 * i, 3), np.uint8)
        arr[:] = c
        Image.fromarray(arr).save(sub / f"t{i}.png")
    (sub / "notes.txt").write_text("not an image")
    aug = PerlinAnomaly(texture_dir=str(tmp_path / "textures"), augment=False, beta=(0.0, 0.0))
    assert len(aug.textures) == 3
    img = np.full((64, 72, 3), 128, np.uint8)
    img[..., 0] = 90  # colour image: textures keep their colour
    seen = set()
    for seed in range(12):
        out, mask = aug(img, np.random.default_rng(seed))
        m = mask.astype(bool)
        assert m.any()
        np.testing.assert_array_equal(out[~m], img[~m])
        vals = np.unique(out[m].reshape(-1, 3), axis=0)
        assert len(vals) == 1 and tuple(vals[0]) in colours  # beta = 0: pure texture
        seen.add(tuple(vals[0]))
        a, b = aug(img, np.random.default_rng(seed)), (out, mask)
        np.testing.assert_array_equal(a[0], b[0])
    assert len(seen) >= 2
    # augmentations on, pathlib.Path accepted, pickles (DataLoader workers)
    aug2 = pickle.loads(pickle.dumps(PerlinAnomaly(texture_dir=tmp_path / "textures")))
    out, mask = aug2(img, np.random.default_rng(0))
    assert out.shape == img.shape and mask.any()


def test_texture_dir_errors(tmp_path):
    with pytest.raises(ConfigError, match="texture_dir"):
        PerlinAnomaly(texture_dir=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ConfigError, match="texture_dir"):
        PerlinAnomaly(texture_dir=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="texture_dir"):
        PerlinAnomaly(texture_dir="")


@pytest.mark.parametrize("kwargs, key", [
    ({"p": 1.5}, "p"),
    ({"p": -0.1}, "p"),
    ({"area_ratio": (0.3, 0.1)}, "area_ratio"),
    ({"area_ratio": (0.0, 0.1)}, "area_ratio"),
    ({"area_ratio": (0.1, 1.0)}, "area_ratio"),
    ({"area_ratio": "big"}, "area_ratio"),
    ({"scale_exponents": (3, 3)}, "scale_exponents"),
    ({"scale_exponents": (-1, 4)}, "scale_exponents"),
    ({"scale_exponents": (0.5, 4)}, "scale_exponents"),
    ({"threshold": 1.0}, "threshold"),
    ({"threshold": "high"}, "threshold"),
    ({"rotation": -5}, "rotation"),
    ({"beta": (0.5, 0.2)}, "beta"),
    ({"beta": (0.0, 1.0)}, "beta"),
    ({"max_tries": 0}, "max_tries"),
    ({"max_tries": 2.5}, "max_tries"),
    ({"augment": "yes"}, "augment"),
    ({"match_gray": None}, "match_gray"),
    ({"texture_dir": 3}, "texture_dir"),
])
def test_bad_config_raises(kwargs, key):
    with pytest.raises(ConfigError, match=key) as info:
        PerlinAnomaly(**kwargs)
    assert key in info.value.key


def test_config_from_any():
    cfg = PerlinConfig.from_any({"area_ratio": [0.01, 0.2], "scale_exponents": [1, 4]})
    assert cfg.area_ratio == (0.01, 0.2) and cfg.scale_exponents == (1, 4)
    assert PerlinConfig.from_any(None) == PerlinConfig()
    with pytest.raises(ConfigError, match="perlin"):
        PerlinConfig.from_any({"no_such_key": 1})
    assert "PerlinAnomaly(p=1.0" in repr(PerlinAnomaly())


def test_large_image_smoke():
    img = _image(300, 300)
    out, mask = PerlinAnomaly()(img, np.random.default_rng(3))
    assert out.shape == (300, 300, 3) and 0.005 <= mask.mean() <= 0.3
