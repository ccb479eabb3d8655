"""Real-world image files on every path that reads them: the training loader, the image cache,
predict's listing and naming, and the inputs of a checkpoint's or an export's Detector.

Every path decodes through adtrain.data.image_io, so the checks here compare the paths' tensors
directly (no model is trained: each test takes well under a second)."""

from __future__ import annotations

import logging
import os
import shutil

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from adtrain.data.image_io import list_images, mask_values, read_image, read_mask
from adtrain.errors import DataError
from adtrain.inference.images import as_rgb
from adtrain.data.file_checks import check_complete, header_size

ORIENT = 0x0112


def _exif(value: int) -> Image.Exif:
    ex = Image.Exif()
    ex[ORIENT] = value
    return ex


def _tagged(arr: np.ndarray, value: int) -> Image.Image:
    im = Image.fromarray(arr)
    im.getexif()[ORIENT] = value
    return im


def _pattern(h=3, w=5) -> np.ndarray:
    """Distinct values everywhere: any flip or turn shows."""
    return (np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3) * 5 + 7).astype(np.uint8)


def _variants(folder):
    """One file per kind a camera, a scanner or an export of another tool writes."""
    rng = np.random.default_rng(0)
    rgb = (rng.random((30, 40, 3)) * 200 + 20).astype(np.uint8)
    pil = Image.fromarray(rgb)
    pil.save(folder / "rgb.png")
    pil.convert("L").save(folder / "grey.png")
    Image.fromarray((np.arange(1200).reshape(30, 40) * 54).astype(np.uint16)).save(folder / "grey16.png")
    cv2.imwrite(str(folder / "grey16.tif"), (np.arange(1200).reshape(30, 40) * 54).astype(np.uint16))
    Image.fromarray(np.dstack([rgb, np.full((30, 40), 90, np.uint8)]), "RGBA").save(folder / "rgba.png")
    pil.convert("P", palette=Image.ADAPTIVE, colors=16).save(folder / "palette.png")
    pil.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    pil.save(folder / "turned.jpg", quality=95, exif=_exif(6))
    pil.save(folder / "scan.bmp")
    pil.resize((1, 1)).save(folder / "one.png")
    Image.fromarray(np.tile(rgb, (2, 50, 1))[:50, :2000]).save(folder / "wide.png")
    pil.save(folder / "UPPER.PNG")
    pil.save(folder / "mit Leerzeichen äöü 検査.png")
    return sorted(folder.iterdir())


# ---------------------------------------------------------------- EXIF orientation
@pytest.mark.parametrize("value", range(1, 9))
def test_exif_orientation_is_applied_as_pillow_does_to_images_masks_and_headers(tmp_path, value):
    """PNG, JPEG and WebP pixels come as stored; Pillow's TIFF reader turns them itself (and its
    header's size was the stored one): each is turned once, and the header agrees."""
    arr = _pattern()
    shown = np.asarray(ImageOps.exif_transpose(_tagged(arr, value)).convert("RGB"))
    for ext in ("png", "tif", "webp"):
        path = tmp_path / f"o{value}.{ext}"
        Image.fromarray(arr).save(path, exif=_exif(value), **({"lossless": True} if ext == "webp" else {}))
        assert np.array_equal(read_image(path), shown), ext
        assert header_size(path) == (shown.shape[1], shown.shape[0]), ext
        assert np.array_equal(mask_values(path), shown), ext
        with Image.open(path) as im:  # a PIL image handed to the Detector as it is
            assert np.array_equal(as_rgb(im, ext), shown), ext
    # a 16-bit colour file (decoded by OpenCV, which ignores the tag) is turned alike
    wide = tmp_path / f"w{value}.png"
    cv2.imwrite(str(wide), arr[:, :, ::-1].astype(np.uint16) * 257)
    _add_exif_chunk(wide, value)
    assert np.array_equal(read_image(wide), shown)
    assert header_size(wide) == (shown.shape[1], shown.shape[0])
    import tifffile  # a 16-bit colour TIFF (OpenCV turned some itself and failed on others)

    tiff = tmp_path / f"w{value}.tif"
    tifffile.imwrite(tiff, arr.astype(np.uint16) * 257, photometric="rgb", extratags=[(ORIENT, "H", 1, value, True)])
    assert np.array_equal(read_image(tiff), shown) and np.array_equal(mask_values(tiff), shown.astype(np.uint16) * 257)
    assert header_size(tiff) == (shown.shape[1], shown.shape[0])


def _add_exif_chunk(png, value: int) -> None:
    """An eXIf chunk after IHDR (Pillow cannot write a 16-bit colour PNG, OpenCV writes no EXIF)."""
    import struct
    import zlib

    data = png.read_bytes()
    body = b"eXIf" + _exif(value).tobytes()[6:]  # without the JPEG APP1 'Exif\0\0' header
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    png.write_bytes(data[:33] + chunk + data[33:])  # signature (8) + IHDR (25)


def test_a_turned_photo_and_the_mask_drawn_on_it_upright_load_together(tmp_path):
    """A phone's photo stored 40x30 with orientation 6 is shown 30x40; a labelling tool's mask is 30x40."""
    from adtrain.data.dataset import Sample, load_sample

    Image.fromarray(_pattern(30, 40)).save(tmp_path / "img.jpg", quality=95, exif=_exif(6))
    mask = np.zeros((40, 30), np.uint8)
    mask[2:6, 20:28] = 255  # drawn near the top right of the upright image
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert header_size(tmp_path / "img.jpg") == header_size(tmp_path / "mask.png") == (30, 40)
    image, m = load_sample(Sample(str(tmp_path / "img.jpg"), 1, str(tmp_path / "mask.png"), "c", "d"))
    assert image.shape == (40, 30, 3) and np.array_equal(m, mask > 0)


def test_a_pil_image_given_to_the_detector_is_turned_as_its_file_is(tmp_path):
    path = tmp_path / "t.jpg"
    Image.fromarray(_pattern(30, 40)).save(path, quality=95, exif=_exif(8))
    with Image.open(path) as im:
        assert np.array_equal(as_rgb(im, "t"), as_rgb(str(path), "t"))
        assert np.array_equal(as_rgb(ImageOps.exif_transpose(im), "t"), as_rgb(str(path), "t"))  # not twice


# ---------------------------------------------------------------- one decode on every path
def test_every_kind_of_file_is_decoded_alike_by_training_the_cache_predict_and_exports(tmp_path):
    """The same file gives the same tensor through the uncached and the cached training loader,
    the Detector's inputs (path and PIL image) and an export's resized uint8 input."""
    from adtrain.data.dataset import AnomalyDataset, Sample
    from adtrain.data.image_cache import ImageCache
    from adtrain.data.resize import ImageResize
    from adtrain.data.transforms import build_transform

    (tmp_path / "f").mkdir()
    files = _variants(tmp_path / "f")
    size, crop = (32, 32), (28, 28)
    tf = build_transform(size, crop, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False, "pil_bilinear")
    samples = [Sample(str(p), 0, None, "c", "good") for p in files]
    plain = AnomalyDataset(samples, tf)
    cached = AnomalyDataset(samples, tf)
    cached.cached = ImageCache(tmp_path / "cache", "auto").entry(cached, size, 0, "pil_bilinear")
    assert cached.cached is not None
    resize = ImageResize(*size, "pil_bilinear")
    for i, p in enumerate(files):
        rgb = read_image(p)
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        with Image.open(p) as im:
            assert np.array_equal(as_rgb(im, p.name), rgb), p.name
        assert np.array_equal(as_rgb(str(p), p.name), rgb), p.name
        a, b = plain[i], cached[i]
        assert np.array_equal(a["image"].numpy(), b["image"].numpy()), p.name
        assert a["image"].shape == (3, *crop)
        assert tuple(a["source_size"].tolist()) == rgb.shape[:2] == tuple(header_size(p))[::-1], p.name
        assert np.array_equal(cached.cached.get(i)[0], resize(image=rgb)["image"]), p.name  # an export's input
    grey, grey16 = read_image(tmp_path / "f" / "grey.png"), read_image(tmp_path / "f" / "grey16.png")
    assert (grey[..., 0] == grey[..., 2]).all()
    values = np.arange(1200).reshape(30, 40) * 54  # 16-bit: over the full 0-65535 range
    assert np.array_equal(grey16[..., 0], np.round(values * 255 / 65535).astype(np.uint8))
    assert np.array_equal(grey16, read_image(tmp_path / "f" / "grey16.tif"))
    assert read_image(tmp_path / "f" / "turned.jpg").shape == (40, 30, 3)


def test_a_32bit_integer_image_is_scaled_as_16_bit_whatever_its_brightest_value():
    """Pillow 10 opens a 16-bit grey PNG as mode I: a dark frame (all values < 256) was read as 8-bit
    values, 257x brighter than a bright frame of the same camera."""
    from adtrain.data.image_io import image_to_rgb

    values = np.array([[0, 100, 255], [200, 250, 60]], np.int32)
    as_i = Image.fromarray(values)
    assert as_i.mode == "I"
    expected = image_to_rgb(Image.fromarray(values.astype(np.uint16)))  # I;16
    assert np.array_equal(image_to_rgb(as_i), expected) and expected.max() == 1
    assert np.array_equal(image_to_rgb(as_i, 8)[..., 0], values.astype(np.uint8))  # bit_depth=8: as they are


# ---------------------------------------------------------------- files that cannot be read
def _bad_files(folder):
    Image.fromarray(_pattern(30, 40)).save(folder / "ok.jpg", quality=95)
    Image.fromarray(_pattern(30, 40)).save(folder / "ok.png")
    data = (folder / "ok.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    data = (folder / "ok.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image\n")
    return ["cut.jpg", "cut.png", "empty.png", "notes.png"]


def test_unreadable_files_raise_a_data_error_naming_them(tmp_path):
    for name in _bad_files(tmp_path):
        path = tmp_path / name
        for read in (read_image, lambda p: as_rgb(str(p), p.name), lambda p: read_mask(p)):
            with pytest.raises(DataError) as err:
                read(path)
            assert name in str(err.value)
        if name.startswith("cut"):  # a PIL image opened lazily and handed to the Detector
            with Image.open(path) as im, pytest.raises(DataError) as err:
                as_rgb(im, name)
            assert name in str(err.value)
        if name in ("empty.png", "notes.png"):  # header_size reads the header only
            with pytest.raises(DataError, match=name):
                header_size(path)


def test_a_file_cut_short_is_found_before_training_and_data_past_the_end_is_not_a_fault(tmp_path, monkeypatch):
    """check_complete (the pre-flight check): files cut short raise as reading them does; whole files,
    with or without bytes past their end (a camera's trailer), pass; only a PNG or JPEG whose end marker
    is missing from its tail is decoded to find out (a BMP's or WebP's header says its length, a
    TIFF's where its strips or tiles lie)."""
    import adtrain.data.image_io as image_io

    _bad_files(tmp_path)
    for ext in ("bmp", "webp"):
        Image.fromarray(_pattern(30, 40)).save(tmp_path / f"ok.{ext}")
        data = (tmp_path / f"ok.{ext}").read_bytes()
        (tmp_path / f"cut.{ext}").write_bytes(data[: len(data) // 2])
    import tifffile

    wide = (np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50)
    Image.fromarray(wide).save(tmp_path / "ok.tif")  # strips
    tifffile.imwrite(tmp_path / "ok.tiff", np.repeat(wide[:, :, None], 3, axis=2)[:32, :32], tile=(16, 16))
    for ext in ("tif", "tiff"):
        data = (tmp_path / f"ok.{ext}").read_bytes()
        (tmp_path / f"cut.{ext}").write_bytes(data[: len(data) * 3 // 4])  # the header (its tags) kept whole
    (tmp_path / "notes.txt").write_text("not an image\n")
    for name in ("cut.tif", "cut.tiff"):
        with pytest.raises(DataError, match=rf"{name}: cannot read image: "):
            check_complete(tmp_path / name)
        with pytest.raises(DataError, match=rf"{name}: cannot read image: "):
            header_size(tmp_path / name, whole=True)
        header_size(tmp_path / name)  # the header alone is whole
    for name in ("cut.jpg", "cut.png", "cut.bmp", "cut.webp"):
        with pytest.raises(DataError, match=rf"{name}: cannot read image: OSError"):
            check_complete(tmp_path / name)
    for name in ("ok.jpg", "ok.png", "ok.bmp", "ok.webp"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"trailer_{name}").write_bytes(data + bytes(5000))  # a PNG's, JPEG's marker not in the tail
    decoded = []
    real = image_io.read_image
    monkeypatch.setattr(image_io, "read_image", lambda p, *a: decoded.append(os.path.basename(p)) or real(p, *a))
    for ext in ("jpg", "png", "bmp", "webp"):
        check_complete(tmp_path / f"ok.{ext}")
        check_complete(tmp_path / f"trailer_ok.{ext}")
    for ext in ("tif", "tiff"):  # whole strips or tiles: passed on the header's word
        check_complete(tmp_path / f"ok.{ext}")
        assert header_size(tmp_path / f"ok.{ext}", whole=True) == ((40, 30) if ext == "tif" else (32, 30))
    check_complete(tmp_path / "notes.txt")  # not a format it knows: left to the decoder
    assert decoded == ["trailer_ok.jpg", "trailer_ok.png"]


# ---------------------------------------------------------------- listing
def _tree(tmp_path):
    root, other = tmp_path / "imgs", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    other.mkdir()
    img = Image.fromarray(_pattern())
    img.save(root / "a.png")
    img.save(root / "sub" / "b.PNG")
    img.save(other / "c.jpg")
    os.symlink(other, root / "linked")                 # a folder linked in from another disk
    os.symlink(root, root / "sub" / "loop")            # a link back up the tree
    os.symlink(root / "a.png", root / "same.png")      # a linked file
    os.symlink(tmp_path / "gone.png", root / "gone.png")  # a link to nothing
    (root / "._a.png").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)  # macOS AppleDouble
    (root / ".hidden").mkdir()
    img.save(root / ".hidden" / "d.png")
    (root / "folder.png").mkdir()                      # a folder with an image's name
    return root


def test_training_and_predict_list_the_same_images_following_linked_folders(tmp_path, caplog):
    from adtrain.predict import list_images as predict_list

    root = _tree(tmp_path)
    with caplog.at_level(logging.WARNING, logger="adtrain"):
        listed = [str(p.relative_to(root)) for p in list_images(root, recursive=True)]
    assert listed == ["a.png", "linked/c.jpg", "same.png", "sub/b.PNG"]
    assert "gone.png" in caplog.text
    assert [os.path.relpath(p, root) for p in predict_list(str(root))] == listed
    assert [p.name for p in list_images(root)] == ["a.png", "same.png"]


def test_predict_refuses_a_name_that_is_not_utf8_before_scoring(tmp_path):
    from adtrain.predict import list_images as predict_list

    Image.fromarray(_pattern()).save(tmp_path / "ok.png")
    shutil.copy(tmp_path / "ok.png", os.fsencode(tmp_path) + b"/caf\xe9.png")
    for spec in (str(tmp_path), str(tmp_path / "*.png")):
        with pytest.raises(DataError, match="not valid UTF-8"):
            predict_list(spec)


def test_heatmap_names_keep_a_linked_files_own_name(tmp_path):
    from adtrain.predict import heatmap_names

    Image.fromarray(_pattern()).save(tmp_path / "a.png")
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")
    names = heatmap_names([str(tmp_path / "a.png"), str(tmp_path / "b.png")])
    assert names == [f"{tmp_path.name}__a.png", f"{tmp_path.name}__b.png"]


def test_two_images_whose_map_files_would_share_a_name_are_refused_first(tmp_path):
    from adtrain.inference.map_files import relative_names

    with pytest.raises(DataError, match="would overwrite") as err:
        relative_names([str(tmp_path / "x" / "UPPER.PNG"), str(tmp_path / "x" / "UPPER.JPG")], tmp_path)
    assert "UPPER.JPG" in str(err.value)
    assert [str(n) for n in relative_names([str(tmp_path / "x" / "a.png"), str(tmp_path / "y" / "a.png")],
                                           tmp_path)] == ["x/a", "y/a"]


# ---------------------------------------------------------------- masks
def test_masks_with_upper_case_extensions_are_found(tmp_path):
    from adtrain.data.folder import FolderDataModule
    from adtrain.data.mvtec import find_mask

    img = Image.fromarray(_pattern(8, 8))
    mask = Image.fromarray(np.full((8, 8), 255, np.uint8))
    for folder in ("good", "bad/dent", "masks/dent", "gt"):
        (tmp_path / folder).mkdir(parents=True)
    for i in range(3):
        img.save(tmp_path / "good" / f"{i}.png")
    img.save(tmp_path / "bad" / "dent" / "x.JPG")
    mask.save(tmp_path / "masks" / "dent" / "x.PNG")
    mask.save(tmp_path / "gt" / "000_mask.PNG")
    assert find_mask(tmp_path / "gt", "000") == tmp_path / "gt" / "000_mask.PNG"
    dm = FolderDataModule(normal_dir=str(tmp_path / "good"), abnormal_dir=str(tmp_path / "bad"),
                          mask_dir=str(tmp_path / "masks"), normal_test_split=0.34, image_size=(8, 8), batch_size=2)
    anomalous = [s for s in dm._test_samples() if s.label == 1]
    assert [s.mask_path for s in anomalous] == [str(tmp_path / "masks" / "dent" / "x.PNG")]


def test_a_defect_folder_linked_in_is_part_of_the_test_set(tmp_path):
    from adtrain.data.folder import FolderDataModule

    img = Image.fromarray(_pattern(8, 8))
    for folder in ("good", "bad/scratch", "nas/dent"):
        (tmp_path / folder).mkdir(parents=True)
    for i in range(3):
        img.save(tmp_path / "good" / f"{i}.png")
    img.save(tmp_path / "bad" / "scratch" / "s.png")
    img.save(tmp_path / "nas" / "dent" / "d.png")
    os.symlink(tmp_path / "nas" / "dent", tmp_path / "bad" / "dent")
    dm = FolderDataModule(normal_dir=str(tmp_path / "good"), abnormal_dir=str(tmp_path / "bad"),
                          normal_test_split=0.34, image_size=(8, 8), batch_size=2)
    assert sorted(s.defect for s in dm._test_samples() if s.label == 1) == ["dent", "scratch"]


@pytest.mark.parametrize("kind", ["zero_one", "grey_edges", "palette"])
def test_mask_encodings_read_as_defect_wherever_nonzero(tmp_path, kind):
    """0/1 masks, anti-aliased grey edges (every grey pixel counts as defect: the documented rule) and
    palette masks (their indices)."""
    m = np.zeros((12, 16), np.uint8)
    m[3:7, 4:10] = 1 if kind == "zero_one" else 255
    if kind == "grey_edges":
        m[2, 4:10] = 40
    im = Image.fromarray(m)
    if kind == "palette":
        im = im.convert("P")
    im.save(tmp_path / "m.png")
    out = read_mask(tmp_path / "m.png", (16, 12))
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 1}
    assert out.sum() == (30 if kind == "grey_edges" else 24)


def test_float_images_read_over_0_1_or_0_255_and_others_are_refused_by_name(tmp_path):
    """A 32-bit float TIFF (mode F): brightness 0..1 or 0..255 as stored; values outside 0..255 (a
    thermal frame in kelvin) are refused naming the file, never clipped into a white image."""
    ramp = np.linspace(0.0, 1.0, 48, dtype=np.float32).reshape(6, 8)
    Image.fromarray(ramp).save(tmp_path / "unit.tif")
    Image.fromarray(ramp * 200).save(tmp_path / "bytes.tif")
    Image.fromarray(ramp * 20 + 290).save(tmp_path / "kelvin.tif")
    assert Image.open(tmp_path / "unit.tif").mode == "F"
    assert np.array_equal(read_image(tmp_path / "unit.tif")[..., 1], np.round(ramp.astype(np.float64) * 255).astype(np.uint8))
    assert np.array_equal(read_image(tmp_path / "bytes.tif")[..., 2], np.round(ramp.astype(np.float64) * 200).astype(np.uint8))
    with pytest.raises(DataError, match="kelvin.tif: cannot read image: a 32-bit float image with values from 290 to 310"):
        read_image(tmp_path / "kelvin.tif")
    with pytest.raises(DataError, match="frame 3.*not clipped"):
        as_rgb(Image.open(tmp_path / "kelvin.tif"), "frame 3")
