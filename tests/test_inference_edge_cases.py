"""Inference-side cases an audit (2026-12-07) found read or named wrongly: a PIL image of a 16-bit
colour file, heatmap names that collided, ``adtrain.test`` refusing a bad file it never reads.
Each failed before its fix (no model is trained)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from adtrain.data.image_io import read_image
from adtrain.errors import DataError


def test_a_pil_image_of_a_16bit_colour_file_is_read_at_its_bit_depth(tmp_path):
    """Pillow opens a 16-bit colour PNG as 8-bit RGB (the high bytes): the Detector scored that,
    whatever data.bit_depth said; it now reads the image's file, as it reads a path."""
    from adtrain.inference.images import as_rgb

    grey = (np.arange(6 * 8, dtype=np.uint16).reshape(6, 8) * 80)  # 12-bit values, 0..3760
    path = tmp_path / "c16.png"
    cv2.imwrite(str(path), np.dstack([grey, grey // 2, grey // 3]))
    with Image.open(path) as im:
        got = as_rgb(im, "c16.png", 12)
    assert np.array_equal(got, read_image(path, 12))
    assert got.max() > 200  # the high bytes alone would read 12-bit values at most 14
    with Image.open(path) as im:  # no file behind it: refused, not scored on 8 of its bits
        im.filename = ""
        with pytest.raises(DataError, match="16-bit colour"):
            as_rgb(im, "memory", 12)


def test_heatmap_names_never_collide():
    """'a/b__c.png' and 'a__b/c.png' joined to one name, and one heatmap showed the other image."""
    from adtrain.predict import heatmap_names

    files = ["/x/a/b__c.png", "/x/a__b/c.png", "/x/a/A.png", "/x/a/a.png", "/x/a/q.png", "/x/a/q.jpg"]
    names = heatmap_names(files)
    assert len({n.lower() for n in names}) == len(files)  # a case-blind disk too
    assert names[2:] == ["a__A.png", "a__a_2.png", "a__q_png.png", "a__q_jpg.png"]
    assert heatmap_names(["/x/crack/000.png", "/x/good/000.png"]) == ["crack__000.png", "good__000.png"]


def test_the_test_files_alone_are_checked_for_a_test_of_a_finished_run(tmp_path):
    """A training image cut short after the fit stopped ``adtrain.test``, which never reads it."""
    from adtrain.data.file_checks import check_files
    from adtrain.data.folder import FolderDataModule

    for sub, n in (("train", 4), ("bad", 2), ("ok", 2)):
        (tmp_path / sub).mkdir()
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(tmp_path / sub / f"{i}.png")
    cut = tmp_path / "train" / "3.png"
    cut.write_bytes(cut.read_bytes()[:40])
    dm = FolderDataModule(normal_dir=str(tmp_path / "train"), abnormal_dir=str(tmp_path / "bad"),
                          normal_test_dir=str(tmp_path / "ok"), val_split=0.0, image_size=8)
    dm.setup()
    with pytest.raises(DataError, match="3.png"):
        check_files(dm)
    check_files(dm, test=True, train=False)
    bad = tmp_path / "bad" / "1.png"
    bad.write_bytes(b"")
    with pytest.raises(DataError, match="1.png"):
        check_files(dm, test=True, train=False)
