"""VisADataModule (split CSV layout) and FolderDataModule (any folders)."""

import csv

import numpy as np
import pytest
from PIL import Image

from adtrain.data import FolderDataModule, VisADataModule
from adtrain.data.testing import write_visa_tree
from adtrain.errors import ConfigError, DataError

COMMON = {"image_size": [32, 32], "batch_size": 4}


def test_visa_counts_labels_masks(tmp_path):
    root = write_visa_tree(tmp_path / "visa", ("candle", "pcb1"), n_train=5, n_test_normal=2,
                           n_test_anomaly=3, mask_value=1)
    dm = VisADataModule(root=str(root), category="candle", **COMMON)
    dm.setup()
    assert len(dm.train_samples) + len(dm.val_samples) == 5 and len(dm.val_samples) == 1
    test = dm.test_samples
    assert [s.label for s in test].count(0) == 2 and [s.label for s in test].count(1) == 3
    assert {s.category for s in test + dm.train_samples} == {"candle"}
    assert all((s.mask_path is not None) == (s.label == 1) for s in test)
    assert {s.defect for s in test} == {"good", "anomaly"}
    batch = next(iter(dm.make_dataloader(test, batch_size=len(test))))
    anom = batch["label"] == 1
    assert batch["has_mask"].all()
    assert (batch["mask"][anom].flatten(1).sum(1) > 0).all()  # mask values 1 (>0) count as defect
    assert batch["mask"][~anom].sum() == 0
    both = VisADataModule(root=str(root), category=["candle", "pcb1"], **COMMON)
    assert {s.category for s in both.test_samples} == {"candle", "pcb1"} and len(both.test_samples) == 10


def test_visa_errors(tmp_path):
    root = write_visa_tree(tmp_path / "visa")
    with pytest.raises(DataError, match="no rows for object 'fryum'.*candle"):
        VisADataModule(root=str(root), category="fryum", **COMMON).setup()
    with pytest.raises(DataError, match="split file not found") as e:
        VisADataModule(root=str(root), category="candle", split_csv="split_csv/2cls.csv", **COMMON).setup()
    assert e.value.path == str(root / "split_csv" / "2cls.csv")
    with pytest.raises(DataError, match="VisA root folder not found.*data.download=true"):
        VisADataModule(root=str(tmp_path / "none"), category="candle", **COMMON).setup()
    (root / "candle/Data/Images/Normal/0001.JPG").unlink()
    with pytest.raises(DataError, match="not found") as e:
        VisADataModule(root=str(root), category="candle", **COMMON).setup()
    assert e.value.path.endswith("0001.JPG")


def test_visa_csv_saved_by_excel_and_a_short_row(tmp_path):
    """A byte-order mark (Excel's "CSV UTF-8") is read past; a row without an image path is named
    by its line, not reported as the root folder missing an image."""
    root = write_visa_tree(tmp_path / "visa")
    path = root / "split_csv" / "1cls.csv"
    text = path.read_text()
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert len(VisADataModule(root=str(root), category="candle", **COMMON).test_samples) > 0
    lines = text.splitlines()
    path.write_text("\n".join(lines + ["candle,test,anomaly"]) + "\n")
    with pytest.raises(DataError, match=f"line {len(lines) + 1}: no image path"):
        VisADataModule(root=str(root), category="candle", **COMMON).setup()


def test_visa_anomaly_without_mask_has_no_mask(tmp_path, caplog):
    root = write_visa_tree(tmp_path / "visa", n_test_anomaly=2)
    csv_path = root / "split_csv/1cls.csv"
    rows = list(csv.reader(open(csv_path)))
    rows[-1][4] = ""
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    dm = VisADataModule(root=str(root), category="candle", **COMMON)
    with caplog.at_level("WARNING", logger="adtrain"):
        anomalies = [s for s in dm.test_samples if s.label == 1]
    assert [s.mask_path is None for s in anomalies] == [False, True]
    said = [r.getMessage() for r in caplog.records if "no mask" in r.getMessage()]  # named, not silent
    assert len(said) == 1 and "1 of 2 anomalous test image(s)" in said[0] and anomalies[1].path in said[0]
    assert dm.make_dataset(anomalies)[1]["has_mask"].item() is False


def _write(folder, names, size=16, value=90):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(folder / n)


def test_folder_split_and_mask_matching(tmp_path, caplog):
    _write(tmp_path / "good", [f"{i:02d}.png" for i in range(10)])
    _write(tmp_path / "bad", ["a.png", "b.png", "c.png", "d.png"], value=200)
    mask_dir = tmp_path / "masks"
    mask_dir.mkdir()
    m = np.zeros((16, 16), np.uint8)
    m[3:6, 3:6] = 255
    Image.fromarray(m).save(mask_dir / "a.png")
    Image.fromarray(m).save(mask_dir / "b_mask.png")
    Image.fromarray(m).save(mask_dir / "d.bmp")  # any image extension, as MVTec-style loaders read
    kw = dict(normal_dir=str(tmp_path / "good"), abnormal_dir=str(tmp_path / "bad"), mask_dir=str(mask_dir),
              normal_test_split=0.3, **COMMON)
    dm = FolderDataModule(**kw)
    dm.setup()
    with caplog.at_level("WARNING", logger="adtrain"):
        _ = dm.test_samples
    said = [r.getMessage() for r in caplog.records if "no mask" in r.getMessage()]
    assert len(said) == 1 and "1 of 4 anomalous test image(s)" in said[0] and "c.png" in said[0]
    test_normals = {s.path for s in dm.test_samples if s.label == 0}
    train_all = {s.path for s in dm.train_samples + dm.val_samples}
    assert len(test_normals) == 3 and len(train_all) == 7 and not test_normals & train_all
    masks = {s.path.rsplit("/", 1)[1]: s.mask_path for s in dm.test_samples if s.label == 1}
    assert masks["a.png"].endswith("masks/a.png") and masks["b.png"].endswith("b_mask.png")
    assert masks["c.png"] is None and masks["d.png"].endswith("masks/d.bmp")
    assert {s.defect for s in dm.test_samples if s.label} == {"bad"}
    assert {s.category for s in dm.test_samples} == {"folder"}
    again = FolderDataModule(**kw)
    assert {s.path for s in again.test_samples if s.label == 0} == test_normals
    other = FolderDataModule(**{**kw, "seed": 5})
    assert {s.path for s in other.test_samples if s.label == 0} != test_normals  # C(10,3)=120 choices
    batch = next(iter(dm.make_dataloader(dm.test_samples, batch_size=7)))
    has = dict(zip([p.rsplit("/", 1)[1] for p in batch["path"]], batch["has_mask"].tolist()))
    assert has["a.png"] and has["b.png"] and not has["c.png"] and has["d.png"]
    wrong = tmp_path / "gt"  # masks named otherwise (<stem>_gt.png): none found is an error, not silence
    wrong.mkdir()
    for n in "abcd":
        Image.fromarray(m).save(wrong / f"{n}_gt.png")
    with pytest.raises(DataError, match=r"holds no mask for any of the 4 anomalous images \(data.mask_dir\).*a.png") as e:
        _ = FolderDataModule(**{**kw, "mask_dir": str(wrong)}).test_samples
    assert e.value.path == str(wrong)


def test_a_mask_found_for_two_anomalous_images_is_refused(tmp_path):
    """abnormal_dir/crack/000.png and abnormal_dir/hole/000.png with a flat mask_dir holding 000.png: both
    were given masks/000.png, so one was scored against the other's ground truth. Per-defect mask
    subfolders resolve it."""
    _write(tmp_path / "good", [f"{i:02d}.png" for i in range(6)])
    for defect in ("crack", "hole"):
        _write(tmp_path / "bad" / defect, ["000.png"], value=200)
    flat = tmp_path / "masks"
    flat.mkdir()
    m = np.zeros((16, 16), np.uint8)
    m[3:6, 3:6] = 255
    Image.fromarray(m).save(flat / "000.png")
    kw = dict(normal_dir=str(tmp_path / "good"), abnormal_dir=str(tmp_path / "bad"), **COMMON)
    with pytest.raises(DataError, match=r"mask found for two anomalous images.*crack/000.png.*hole/000.png") as e:
        _ = FolderDataModule(mask_dir=str(flat), **kw).test_samples
    assert e.value.path == str(flat / "000.png")
    nested = tmp_path / "masks_by_defect"
    for defect in ("crack", "hole"):
        (nested / defect).mkdir(parents=True)
        Image.fromarray(m).save(nested / defect / "000.png")
    masks = {s.defect: s.mask_path for s in FolderDataModule(mask_dir=str(nested), **kw).test_samples if s.label}
    assert masks == {"crack": str(nested / "crack" / "000.png"), "hole": str(nested / "hole" / "000.png")}


def test_folder_normal_test_dir_and_errors(tmp_path):
    _write(tmp_path / "good", ["1.png", "2.png", "3.png", "4.png", "5.png"])
    _write(tmp_path / "good_test", ["t.png"])
    dm = FolderDataModule(normal_dir=str(tmp_path / "good"), normal_test_dir=str(tmp_path / "good_test"),
                          category="parts", **COMMON)
    assert len(dm.train_samples) + len(dm.val_samples) == 5
    assert [s.path.rsplit("/", 1)[1] for s in dm.test_samples] == ["t.png"]
    with pytest.raises(DataError, match="folder not found") as e:
        FolderDataModule(normal_dir=str(tmp_path / "nope"), **COMMON).setup()
    assert e.value.path == str(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        FolderDataModule(normal_dir=str(tmp_path / "empty"), **COMMON).setup()
    with pytest.raises(ConfigError, match="data.normal_test_split"):
        FolderDataModule(normal_dir=str(tmp_path / "good"), normal_test_split=1.0, **COMMON)


def test_folder_datasets_nested_in_each_other_keep_their_images_apart(tmp_path):
    """Masks kept inside the anomaly folder, anomalies inside the normal folder: each folder's
    images are its own (a mask is never a test image, an anomaly never a training normal); one
    folder given for two roles is refused."""
    root = tmp_path / "data"
    _write(root, [f"{i:02d}.png" for i in range(6)])
    _write(root / "bad", ["a.png", "b.png"], value=200)
    m = np.zeros((16, 16), np.uint8)
    m[3:6, 3:6] = 255
    (root / "bad" / "masks").mkdir()
    for n in ("a.png", "b.png"):
        Image.fromarray(m).save(root / "bad" / "masks" / n)
    dm = FolderDataModule(normal_dir=str(root), abnormal_dir=str(root / "bad"), mask_dir=str(root / "bad" / "masks"),
                          normal_test_split=0.5, **COMMON)
    every = dm.train_samples + dm.val_samples + dm.test_samples
    assert len(every) == 8 and sum(s.label for s in every) == 2
    assert all("/bad/" not in s.path for s in every if s.label == 0)
    assert sorted(s.mask_path.rsplit("/", 1)[1] for s in every if s.label == 1) == ["a.png", "b.png"]
    with pytest.raises(ConfigError, match="data.abnormal_dir"):
        FolderDataModule(normal_dir=str(root), abnormal_dir=str(root), **COMMON)


def test_a_run_warns_when_its_images_are_stretched_far_out_of_shape(tmp_path, caplog):
    """Line-scan strips (200x40) squeezed into a square input: warned, naming both shapes and the key;
    an input of their shape, or VisA's 1.5:1 boards at a square input, are not."""
    from adtrain.data.file_checks import check_files, warn_stretched

    good = tmp_path / "good"
    good.mkdir()
    for i in range(6):
        Image.fromarray(np.full((40, 200, 3), 90, np.uint8)).save(good / f"{i}.png")
    square = FolderDataModule(normal_dir=str(good), image_size=[32, 32], batch_size=4)
    square.setup()
    with caplog.at_level("WARNING", logger="adtrain"):
        check_files(square, test=False)
    assert "typically 200x40 (width/height 5)" in caplog.text and "stretched 5.0x" in caplog.text
    assert "method.image_size=[32, 32]" in caplog.text
    caplog.clear()
    shaped = FolderDataModule(normal_dir=str(good), image_size=[16, 80], batch_size=4)
    shaped.setup()
    with caplog.at_level("WARNING", logger="adtrain"):
        check_files(shaped, test=False)
    assert "stretched" not in caplog.text
    assert warn_stretched([(1500, 1000)] * 3 + [(300, 3000)], (256, 256)) == pytest.approx(1.5)  # the median shape


def test_images_far_smaller_than_the_rest_of_their_split_are_named(tmp_path, caplog):
    """A 1x1 placeholder and a thumbnail among 96x64 frames, in training and in test: each split names
    its own; a split of uniformly small images, or a frame a little smaller, is not warned about."""
    from adtrain.data.file_checks import check_files, warn_small

    good, test_good, bad = tmp_path / "good", tmp_path / "test_good", tmp_path / "bad" / "crack"
    for folder in (good, test_good, bad):
        folder.mkdir(parents=True)
    for i in range(8):
        Image.fromarray(np.full((64, 96, 3), 90, np.uint8)).save(good / f"{i}.png")
        Image.fromarray(np.full((64, 96, 3), 90, np.uint8)).save(test_good / f"{i}.png")
        Image.fromarray(np.full((64, 96, 3), 200, np.uint8)).save(bad / f"{i}.png")
    Image.fromarray(np.full((1, 1, 3), 90, np.uint8)).save(good / "placeholder.png")
    Image.fromarray(np.full((12, 16, 3), 200, np.uint8)).save(bad / "thumb.png")
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(bad / "smaller.png")  # 1.6x: not warned
    dm = FolderDataModule(normal_dir=str(good), normal_test_dir=str(test_good), abnormal_dir=str(tmp_path / "bad"),
                          image_size=[64, 96], batch_size=4)
    dm.setup()
    with caplog.at_level("WARNING", logger="adtrain"):
        check_files(dm)
    said = [r.getMessage() for r in caplog.records if "smaller than the split's typical" in r.getMessage()
            or "smaller than the training images' typical" in r.getMessage()]
    assert len(said) == 2 and said[0].startswith("1 training image(s)") and "placeholder.png (1x1)" in said[0]
    assert said[1].startswith("1 test image(s)") and "thumb.png (16x12)" in said[1] and "smaller.png" not in said[1]
    assert warn_small([(16, 12)] * 6, [f"{i}.png" for i in range(6)], "training") == []
    # a test set of thumbnails beside full-size training frames: named against the training images
    caplog.clear()
    with caplog.at_level("WARNING", logger="adtrain"):
        thumbs = warn_small([(16, 12)] * 6, [f"{i}.png" for i in range(6)], "test", reference=[(96, 64)] * 8)
    assert len(thumbs) == 6 and "than the training images' typical 96x64" in caplog.text
    assert warn_small([(96, 64)] * 6, [f"{i}.png" for i in range(6)], "test", reference=[(100, 70)] * 8) == []
