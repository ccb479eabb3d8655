"""MVTecDataModule and the common AnomalyDataModule behaviour (split, shots, augment, contract)."""

import logging

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image

from adtrain.data import MVTecDataModule
from adtrain.data.testing import write_mvtec_tree
from adtrain.errors import ConfigError, DataError


@pytest.fixture()
def root(tmp_path):
    r = tmp_path / "mvtec"
    write_mvtec_tree(r, "widget", n_train=10, n_test_good=2, defects={"crack": 3},
                     defects_without_gt={"stain": 2})
    write_mvtec_tree(r, "gadget", n_train=5, n_test_good=1, defects={"hole": 1}, seed=1)
    return r


def _dm(root, category="widget", **kw):
    kw.setdefault("image_size", [32, 32])
    kw.setdefault("batch_size", 4)
    return MVTecDataModule(root=str(root), category=category, **kw)


def test_counts_labels_and_masks(root, caplog):
    dm = _dm(root)
    dm.setup()
    assert len(dm.train_samples) + len(dm.val_samples) == 10
    assert len(dm.val_samples) == 2  # 20 % of 10
    with caplog.at_level(logging.WARNING, logger="adtrain"):
        dm._test_samples()  # the run's file checks list the test set before the run does
        test = dm.test_samples
    # a defect type without ground truth is allowed, and said once (a renamed ground_truth/ must not pass unseen)
    assert [r.getMessage() for r in caplog.records if "no ground-truth folder" in r.getMessage()] == [
        f"MVTec AD widget: no ground-truth folder for the defect type(s) stain (expected "
        f"{root / 'widget' / 'ground_truth'}/<defect>/): their images count for the image metrics only, not the "
        "pixel metrics"]
    assert len(test) == 7
    by_defect = {d: [s for s in test if s.defect == d] for d in ("good", "crack", "stain")}
    assert [len(v) for v in by_defect.values()] == [2, 3, 2]
    assert all(s.label == 0 for s in by_defect["good"])
    assert all(s.label == 1 and s.mask_path.endswith("_mask.png") for s in by_defect["crack"])
    assert all(s.label == 1 and s.mask_path is None for s in by_defect["stain"])
    batch = next(iter(dm.make_dataloader(test, batch_size=len(test))))
    has = dict(zip(batch["defect"], batch["has_mask"].tolist()))
    assert has == {"good": True, "crack": True, "stain": False}
    crack = [i for i, d in enumerate(batch["defect"]) if d == "crack"]
    assert all(batch["mask"][i].sum() > 0 for i in crack)
    others = [i for i, d in enumerate(batch["defect"]) if d != "crack"]
    assert batch["mask"][others].sum() == 0


def test_batch_contract(root):
    dm = _dm(root, image_size=[40, 40], center_crop=[32, 24], eval_batch_size=3)
    batch = next(iter(dm.test_dataloader()))
    assert set(batch) == {"image", "label", "mask", "has_mask", "category", "defect", "path", "source_size", "index"}
    assert batch["source_size"].dtype == torch.int64 and batch["source_size"].tolist() == [[32, 32]] * 3  # before resize
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (3, 3, 32, 24)  # data.device_normalize
    off = next(iter(_dm(root, image_size=[40, 40], center_crop=[32, 24], eval_batch_size=3,
                        device_normalize="off").test_dataloader()))
    assert off["image"].dtype == torch.float32 and torch.equal(dm.input_normalizer(batch["image"]), off["image"])
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (3,)
    assert batch["mask"].dtype == torch.uint8 and batch["mask"].shape == (3, 1, 32, 24)
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    assert batch["has_mask"].dtype == torch.bool and batch["has_mask"].shape == (3,)
    for key in ("category", "defect", "path"):
        assert isinstance(batch[key], list) and all(isinstance(v, str) for v in batch[key])
    # ImageNet normalisation: a pixel of 255 maps to (1 - mean) / std
    img = np.full((10, 10, 3), 255, np.uint8)
    Image.fromarray(img).save(root / "white.png")
    x = dm.predict_dataset([root / "white.png"])[0]["image"]
    expected = (1 - torch.tensor(dm.mean)) / torch.tensor(dm.std)
    torch.testing.assert_close(x[:, 0, 0], expected)
    train = next(iter(dm.train_dataloader()))
    assert train["image"].shape[0] == 4 and train["label"].eq(0).all()


def test_heldout_split_disjoint_deterministic_and_seeded(root):
    a, b, c = _dm(root, seed=0), _dm(root, seed=0), _dm(root, seed=3)
    for dm in (a, b, c):
        dm.setup()
    tr, va = {s.path for s in a.train_samples}, {s.path for s in a.val_samples}
    assert not tr & va and len(tr | va) == 10
    assert [s.path for s in a.val_samples] == [s.path for s in b.val_samples]
    assert [s.path for s in a.train_samples] == [s.path for s in b.train_samples]
    assert {s.path for s in c.val_samples} != va  # another seed, another split (C(10,2)=45 choices)
    assert not {s.path for s in a.test_samples} & (tr | va)


def test_multi_category_task_and_shots(root):
    dm = _dm(root, category=["widget", "gadget"], shots=2)
    dm.setup()
    cats = [s.category for s in dm.train_samples]
    assert cats.count("widget") == 2 and cats.count("gadget") == 2
    val_cats = [s.category for s in dm.val_samples]
    assert val_cats.count("widget") == 2 and val_cats.count("gadget") == 1
    full = _dm(root, category=["widget", "gadget"])
    full.setup()
    assert [s.path for s in full.val_samples] == [s.path for s in dm.val_samples]  # held-out set stays
    assert {s.path for s in dm.train_samples} < {s.path for s in full.train_samples}
    assert {s.category for s in dm.test_samples} == {"widget", "gadget"}
    with pytest.raises(ConfigError, match="data.shots"):
        _dm(root, category="gadget", shots=9).setup()


def test_missing_root_category_and_empty_train(tmp_path, root):
    with pytest.raises(DataError, match="data.download=true") as e:
        _dm(tmp_path / "nowhere").setup()
    assert str(tmp_path / "nowhere") in str(e.value)
    with pytest.raises(DataError, match="category folder not found") as e:
        _dm(root, category="nonexistent").setup()
    assert e.value.path == str(root / "nonexistent") and "widget" in str(e.value)
    for p in (root / "gadget" / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="no training images") as e:
        _dm(root, category="gadget").setup()
    assert e.value.path == str(root / "gadget" / "train" / "good")


def test_missing_individual_mask_is_an_error(root):
    (root / "widget" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DataError, match="ground-truth mask missing") as e:
        _dm(root).test_samples  # listed on first use (a run's pre-flight check lists it before training)
    assert "001_mask.png" in e.value.path


def test_augment_flips_image_and_mask_together(root):
    dm = _dm(root, augment=[{"_target_": "albumentations.HorizontalFlip", "p": 1.0}])
    crack = [s for s in (_dm(root).test_samples) if s.defect == "crack"][1]
    flipped = dm.make_dataset([crack], train=True)[0]
    plain = dm.make_dataset([crack], train=False)[0]
    assert plain["mask"].sum() > 0
    torch.testing.assert_close(flipped["mask"], plain["mask"].flip(-1))
    assert flipped["image"].dtype == torch.float32 and plain["image"].dtype == torch.uint8  # augmented: float path
    torch.testing.assert_close(flipped["image"], dm.input_normalizer(plain["image"]).flip(-1), rtol=0, atol=0)
    assert not torch.equal(flipped["mask"], plain["mask"])  # the defect is off-centre
    # objects work too, and the eval loaders are never augmented
    dm2 = _dm(root, augment=[A.HorizontalFlip(p=1.0)])
    torch.testing.assert_close(dm2.make_dataset([crack])[0]["image"], plain["image"])
    with pytest.raises(ConfigError, match=r"data.augment\[0\]"):
        _dm(root, augment=[{"p": 1.0}])


def test_synthetic_anomaly_hook_applies_to_training_only(root):
    def paint(image, rng):
        out = image.copy()
        mask = np.zeros(image.shape[:2], np.uint8)
        mask[:4, :4] = 1
        out[:4, :4] = 255
        return out, mask

    dm = _dm(root, synthetic_anomaly=paint, val_split=0.0)
    item = dm.make_dataset(dm.train_samples, train=True)[0]
    assert item["label"] == 1 and item["has_mask"] and item["mask"][0, :4, :4].eq(1).all()
    assert item["mask"].sum() == 16 and item["defect"] == "synthetic"
    assert dm.make_dataset(dm.train_samples)[0]["label"] == 0
    assert len(dm.val_samples) == 0


def test_bad_common_arguments(root):
    with pytest.raises(ConfigError, match="data.val_split"):
        _dm(root, val_split=1.5)
    with pytest.raises(ConfigError, match="data.center_crop"):
        _dm(root, image_size=[32, 32], center_crop=[40, 40])
    with pytest.raises(ConfigError, match="data.image_size"):
        _dm(root, image_size="big")
