"""Files and folders real datasets hold that once read wrongly: TIFFs Pillow memory-maps, planar
16-bit colour TIFFs, a codec only imagecodecs has, linked anomaly folders inside the normal one,
hidden folders beside the defect types. Each case failed before its fix (no model is trained)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from adtrain.data.file_checks import header_size
from adtrain.data.image_io import is_wide, mask_values, read_image
from adtrain.data.orientation import upright
from adtrain.errors import DataError

ORIENT = 0x0112


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
@pytest.mark.parametrize("value", [5, 6, 7, 8])
def test_a_memory_mapped_tiff_turned_a_quarter_is_read_upright(tmp_path, mode, value):
    """Pillow memory-maps an uncompressed single-strip TIFF opened by name at the turned size and
    scrambled its pixels (modes L, RGBA, I;16...; RGB was spared); the header said the right size."""
    grey = np.arange(5 * 7, dtype=np.uint8).reshape(5, 7) * 7
    arr = {"L": grey, "RGBA": np.dstack([grey, grey[::-1], 255 - grey, np.full_like(grey, 255)]),
           "I;16": grey.astype(np.uint16) * 257}[mode]
    ex = Image.Exif()
    ex[ORIENT] = value
    path = tmp_path / f"o{value}.tif"
    Image.fromarray(arr).save(path, exif=ex)
    shown = upright(arr, value)
    got = read_image(path)
    if mode == "RGBA":
        want = shown[:, :, :3]
    else:
        want = np.repeat((shown if mode == "L" else shown // 257).astype(np.uint8)[:, :, None], 3, 2)
    assert np.array_equal(got, want)
    assert header_size(path) == (shown.shape[1], shown.shape[0])
    if mode == "L":
        assert np.array_equal(mask_values(path), shown)


def test_a_planar_16bit_colour_tiff_keeps_its_channels_and_bits(tmp_path):
    """One plane per channel (tifffile writes a (3,H,W) array so): Pillow lists its planes as 8-bit
    R, G, B and was read as such, each 16-bit value's bytes as two pixels."""
    import tifffile

    rgb = np.zeros((4, 6, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 4095, 2048, 1000
    planar, contig = tmp_path / "planar.tif", tmp_path / "contig.tif"
    tifffile.imwrite(planar, np.moveaxis(rgb, 2, 0), photometric="rgb", planarconfig="separate")
    tifffile.imwrite(contig, rgb, photometric="rgb")
    with Image.open(planar) as im:
        assert is_wide(im)
    assert np.array_equal(read_image(planar, 12), read_image(contig, 12))
    assert read_image(planar, 12)[0, 0].tolist() == [255, 128, 62]
    mask = np.zeros((3, 4, 6), np.uint16)
    mask[:, 1, 1] = 1  # a defect drawn with value 1 in a 16-bit colour mask
    tifffile.imwrite(tmp_path / "mask.tif", mask, photometric="rgb", planarconfig="separate")
    assert np.argwhere(mask_values(tmp_path / "mask.tif").any(axis=-1)).tolist() == [[1, 1]]


def test_a_turned_lzw_16bit_colour_tiff_without_imagecodecs_is_named_before_training(tmp_path, monkeypatch):
    """tifffile needs imagecodecs for LZW (OpenCV's default TIFF compression) and OpenCV fails on
    such a turned file: the header check (before training) says so, naming the file and the fix."""
    import tifffile

    calls = []

    def no_codec(*args, **kwargs):
        calls.append(args)
        raise ValueError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")

    path = tmp_path / "turned.tif"
    tifffile.imwrite(path, np.full((4, 6, 3), 65535, np.uint16), photometric="rgb",
                     extratags=[(ORIENT, "H", 1, 6, True)])
    monkeypatch.setattr(tifffile, "imread", no_codec)
    with pytest.raises(DataError, match="imagecodecs") as err:
        header_size(path)
    assert str(path) in str(err.value) and calls
    monkeypatch.undo()
    assert header_size(path) == (4, 6) and read_image(path).shape == (6, 4, 3)


@pytest.mark.parametrize("how", ["file_links", "linked_folder"])
def test_anomalies_linked_inside_the_normal_folder_stay_out_of_training(tmp_path, how):
    """abnormal_dir inside normal_dir is left out of the normals; its links used to be judged by
    their targets only, so anomalies kept elsewhere were trained on as normal (and tested too)."""
    from adtrain.data.folder import FolderDataModule

    store = tmp_path / "store"
    for sub, n in (("good", 4), ("bad", 2)):
        (store / sub).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 100 + i, np.uint8)).save(store / sub / f"{sub}{i}.png")
    data = tmp_path / "data"
    if how == "file_links":
        (data / "bad").mkdir(parents=True)
        for sub, dest in (("good", data), ("bad", data / "bad")):
            for p in (store / sub).iterdir():
                (dest / p.name).symlink_to(p)
    else:
        data.mkdir()
        for p in (store / "good").iterdir():
            (data / p.name).write_bytes(p.read_bytes())
        (data / "bad").symlink_to(store / "bad")
    dm = FolderDataModule(normal_dir=str(data), abnormal_dir=str(data / "bad"), val_split=0.0,
                          normal_test_split=0.0, image_size=8)
    dm.setup()
    assert sorted(os.path.basename(s.path) for s in dm.train_samples) == [f"good{i}.png" for i in range(4)]


def test_a_hidden_folder_among_the_defect_types_is_not_one(tmp_path):
    """A notebook's .ipynb_checkpoints (or a sync tool's folder) in test/ became a defect type of
    label 1, its copies scored as anomalies."""
    from adtrain.data.mvtec import MVTecDataModule

    img = Image.fromarray(np.full((8, 8, 3), 120, np.uint8))
    root = tmp_path / "mvtec"
    for folder in ("bottle/train/good", "bottle/test/good", "bottle/test/.ipynb_checkpoints"):
        (root / folder).mkdir(parents=True)
    for i in range(3):
        img.save(root / "bottle/train/good" / f"{i:03d}.png")
    img.save(root / "bottle/test/good/000.png")
    img.save(root / "bottle/test/.ipynb_checkpoints/000-checkpoint.png")
    dm = MVTecDataModule(root=str(root), category="bottle", image_size=8)
    assert [(s.defect, s.label) for s in dm._test_samples()] == [("good", 0)]
