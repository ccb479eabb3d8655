"""Image / mask reading: modes, errors naming the file, errors from DataLoader workers."""

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from adtrain.data.dataset import AnomalyDataset, Sample
from adtrain.data.image_io import expand_image_paths, read_image, read_mask
from adtrain.data.transforms import build_transform
from adtrain.errors import DataError


def _save(path, arr, mode=None, **kw):
    im = Image.fromarray(arr, mode=mode) if mode else Image.fromarray(arr)
    im.save(path, **kw)
    return path


def test_grayscale_becomes_rgb_uint8(tmp_path):
    arr = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)
    out = read_image(_save(tmp_path / "g.png", arr))
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], arr)


def test_rgba_drops_alpha(tmp_path):
    arr = np.zeros((8, 10, 4), np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2], arr[..., 3] = 200, 100, 50, 0
    out = read_image(_save(tmp_path / "a.png", arr))
    assert out.shape == (8, 10, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == (200, 100, 50)


def test_a_multi_page_tiff_is_read_by_its_first_page_and_said_once(tmp_path, caplog):
    import logging

    pages = [np.full((16, 16, 3), v, np.uint8) for v in (40, 200)]
    path = tmp_path / "stack.tif"
    Image.fromarray(pages[0]).save(path, save_all=True, append_images=[Image.fromarray(pages[1])])
    with caplog.at_level(logging.WARNING, logger="adtrain"):
        for _ in range(2):
            np.testing.assert_array_equal(read_image(path), pages[0])
        read_image(_save(tmp_path / "one.tif", pages[1]))
    said = [r.getMessage() for r in caplog.records if "pages" in r.getMessage()]
    assert said == [f"{path} holds 2 pages (frames): only the first is read"]  # was silent


def test_an_image_over_pillows_size_guard_says_what_can_be_done(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # refused at twice this (Pillow's 179 MP by default)
    path = _save(tmp_path / "linescan.png", np.zeros((100, 100), np.uint8))
    with pytest.raises(DataError, match=r"linescan\.png: cannot read image: DecompressionBombError.*cut into tiles.*"
                                        r"PIL\.Image\.MAX_IMAGE_PIXELS"):
        read_image(path)


def test_palette_becomes_rgb(tmp_path):
    im = Image.new("P", (6, 4))
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    im.putpixel((2, 1), 1)
    im.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    assert out.shape == (4, 6, 3)
    assert tuple(out[1, 2]) == (10, 200, 30) and tuple(out[0, 0]) == (0, 0, 0)


def test_16bit_scaled_by_full_range(tmp_path):
    arr = np.array([[0, 257 * 100, 65535, 257 * 255]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "d.png")
    with Image.open(tmp_path / "d.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    out = read_image(tmp_path / "d.png")
    assert out.dtype == np.uint8 and out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 100, 255, 255]


def test_corrupt_and_missing_files_raise_dataerror_naming_path(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(DataError, match="cannot read image") as e:
        read_image(bad)
    assert str(bad) in str(e.value) and e.value.path == str(bad)
    # truncated real PNG
    good = _save(tmp_path / "ok.png", np.full((64, 64, 3), 7, np.uint8))
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:60])
    with pytest.raises(DataError, match="trunc.png: cannot read image"):
        read_image(trunc)
    with pytest.raises(DataError, match="missing.png: cannot read image"):
        read_image(tmp_path / "missing.png")


def test_mask_values_and_size_check(tmp_path):
    m = np.zeros((16, 16), np.uint8)
    m[2:5, 3:7] = 1  # VisA-style small ints
    mask = read_mask(_save(tmp_path / "m.png", m), (16, 16))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1} and mask.sum() == 12
    m255 = _save(tmp_path / "m255.png", m * 255)
    assert read_mask(m255).sum() == 12
    with pytest.raises(DataError, match=r"mask size 16x16 differs from image .*img.png 20x16") as e:
        read_mask(m255, (20, 16), image_path=tmp_path / "img.png")
    assert e.value.path == str(m255)


def test_mask_mismatch_via_dataset_names_mask(tmp_path):
    img = _save(tmp_path / "img.png", np.zeros((20, 20, 3), np.uint8))
    mask = _save(tmp_path / "img_mask.png", np.zeros((16, 16), np.uint8))
    ds = AnomalyDataset([Sample(str(img), 1, str(mask), "c", "d")], build_transform((16, 16)))
    with pytest.raises(DataError, match="img_mask.png: mask size 16x16 differs from image"):
        ds[0]


def test_error_in_worker_keeps_message(tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"garbage")
    ds = AnomalyDataset([Sample(str(bad), 0, None, "c", "good")], build_transform((8, 8)))
    loader = DataLoader(ds, batch_size=1, num_workers=1)
    with pytest.raises(DataError) as e:
        next(iter(loader))
    assert "corrupt.png" in str(e.value) and "cannot read image" in str(e.value)


def test_expand_image_paths(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in expand_image_paths(tmp_path)] == ["a.jpg", "b.png"]
    assert [p.name for p in expand_image_paths(str(tmp_path / "*.png"))] == ["b.png"]
    with pytest.raises(DataError, match="no image files"):
        expand_image_paths(str(tmp_path / "*.bmp"))


def test_a_file_name_that_is_not_utf8_is_refused_naming_it(tmp_path):
    """Latin-1 names from a zip made on Windows: refused when listed, with the name shown, not
    a UnicodeEncodeError from a seed or a CSV writer after the fit."""
    import os

    from adtrain.data.image_io import list_images

    folder = tmp_path / "good"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "ok.png")
    assert [p.name for p in list_images(folder)] == ["ok.png"]
    os.rename(folder / "ok.png", os.fsencode(folder) + b"/caf\xe9.png")
    with pytest.raises(DataError, match="not valid UTF-8") as err:
        list_images(folder)
    assert "caf\\xe9.png" in str(err.value)


def test_an_image_already_at_the_run_size_reaches_torch_without_a_read_only_warning(tmp_path):
    import warnings

    path = tmp_path / "at_size.png"
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(path)
    assert read_image(path).flags.writeable  # np.asarray of a PIL image is read-only
    ds = AnomalyDataset([Sample(str(path), 0, None, "c", "good")], build_transform((32, 32), None, None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch: "The given NumPy array is not writable"
        assert ds[0]["image"].shape == (3, 32, 32)
