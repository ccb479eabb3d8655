"""ElpvDataModule (installed elpv-dataset package) and SyntheticDataModule (in-memory)."""

from collections import Counter

import numpy as np
import pytest
import torch

from adtrain.data import ElpvDataModule, SyntheticDataModule
from adtrain.data.elpv import elpv_labels_file
from adtrain.data.synthetic import SyntheticRenderer
from adtrain.errors import ConfigError, DataError

COMMON = {"image_size": [32, 32], "batch_size": 4}


def _labels():
    """Counts per (type, probability) read independently of the module under test."""
    pytest.importorskip("elpv_dataset")
    counts = Counter()
    for line in open(elpv_labels_file()):
        path, prob, kind = line.split()
        counts[(kind, round(float(prob), 2))] += 1
    return counts


@pytest.mark.parametrize("uncertain", ["exclude", "anomalous", "normal"])
@pytest.mark.parametrize("kind", ["mono", "poly"])
def test_elpv_counts_match_labels(kind, uncertain):
    c = _labels()
    normal, defective = c[(kind, 0.0)], c[(kind, 1.0)]
    unsure = c[(kind, 0.33)] + c[(kind, 0.67)]
    assert normal > 100 and defective > 100 and unsure > 50
    dm = ElpvDataModule(category=kind, uncertain=uncertain, **COMMON)
    dm.setup()
    n_test_normal = round(0.4 * normal)
    assert len(dm.train_samples) + len(dm.val_samples) == normal - n_test_normal
    labels = Counter(s.label for s in dm.test_samples)
    extra = {"exclude": (0, 0), "anomalous": (0, unsure), "normal": (unsure, 0)}[uncertain]
    assert labels[0] == n_test_normal + extra[0]
    assert labels[1] == defective + extra[1]
    assert {s.category for s in dm.test_samples} == {kind}
    train_paths = {s.path for s in dm.train_samples + dm.val_samples}
    assert not train_paths & {s.path for s in dm.test_samples}


def test_elpv_split_reproducible_and_batches():
    a = ElpvDataModule(category="all", seed=1, **COMMON)
    b = ElpvDataModule(category="all", seed=1, **COMMON)
    c = ElpvDataModule(category="all", seed=2, **COMMON)
    mono = ElpvDataModule(category="mono", seed=1, **COMMON)
    assert [s.path for s in a.test_samples] == [s.path for s in b.test_samples]
    assert [s.path for s in a.val_samples] == [s.path for s in b.val_samples]
    assert {s.path for s in a.test_samples} != {s.path for s in c.test_samples}
    # a type's split does not depend on which other types are loaded
    assert [s.path for s in a.test_samples if s.category == "mono"] == [s.path for s in mono.test_samples]
    assert {s.category for s in a.train_samples} == {"mono", "poly"}
    anomalies = [s for s in a.test_samples if s.label == 1][:2]
    batch = next(iter(a.make_dataloader(anomalies + a.val_samples[:2])))
    assert batch["image"].shape == (4, 3, 32, 32)
    assert batch["has_mask"].tolist() == [False, False, True, True]
    assert batch["mask"].sum() == 0
    # grayscale cells become three equal channels (uint8 batches: normalised later, on the device)
    assert batch["image"].dtype == torch.uint8
    assert torch.equal(batch["image"][:, 0], batch["image"][:, 1]) and torch.equal(batch["image"][:, 0], batch["image"][:, 2])


def test_elpv_bad_arguments(monkeypatch):
    with pytest.raises(ConfigError, match="data.uncertain"):
        ElpvDataModule(uncertain="maybe", **COMMON)
    with pytest.raises(ConfigError, match="data.category"):
        ElpvDataModule(category="thin", **COMMON)
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "elpv_dataset" else real(n, *a))
    with pytest.raises(DataError, match="pip install elpv-dataset"):
        ElpvDataModule(**COMMON).setup()


def test_synthetic_deterministic_with_nonempty_masks():
    kw = dict(num_train=6, num_test_normal=3, num_test_anomalous=6, size=32, **COMMON)
    a, b = SyntheticDataModule(seed=4, **kw), SyntheticDataModule(seed=4, **kw)
    ra, rb = a.sample_loader(), b.sample_loader()
    for sa, sb in zip(a.test_samples, b.test_samples):
        (ia, ma), (ib, mb) = ra(sa), rb(sb)
        assert ia.dtype == np.uint8 and ia.shape == (32, 32, 3)
        np.testing.assert_array_equal(ia, ib)
        if sa.label:
            np.testing.assert_array_equal(ma, mb)
            assert ma.sum() >= 4
            # defects clearly visible: mean grey inside differs from outside by > 40 levels
            grey = ia.astype(float).mean(2)
            assert abs(grey[ma > 0].mean() - grey[ma == 0].mean()) > 40
        else:
            assert ma is None
    assert {s.defect for s in a.test_samples if s.label} == {"scratch", "blob", "spots"}
    other = SyntheticDataModule(seed=5, **kw)
    assert not np.array_equal(ra(a.train_samples[0])[0], other.sample_loader()(other.train_samples[0])[0])
    # images of one split differ from each other
    assert not np.array_equal(ra(a.train_samples[0])[0], ra(a.train_samples[1])[0])
    batch = next(iter(a.make_dataloader(a.test_samples, batch_size=9)))
    assert batch["mask"][batch["label"] == 1].flatten(1).sum(1).gt(0).all()
    assert batch["mask"][batch["label"] == 0].sum() == 0 and batch["has_mask"].all()


def test_synthetic_categories_differ_and_pickle():
    import pickle
    dm = SyntheticDataModule(category=["texture", "grid", "stripes"], num_train=5, num_test_normal=1,
                             num_test_anomalous=1, size=32, **COMMON)
    dm.setup()
    assert Counter(s.category for s in dm.train_samples + dm.val_samples) == {"texture": 5, "grid": 5, "stripes": 5}
    r = dm.sample_loader()
    assert pickle.loads(pickle.dumps(r)) == r and isinstance(r, SyntheticRenderer)
    firsts = {c: r(next(s for s in dm.train_samples if s.category == c))[0] for c in ("texture", "grid", "stripes")}
    assert not np.array_equal(firsts["texture"], firsts["grid"])
    with pytest.raises(ConfigError, match="data.category"):
        SyntheticDataModule(category="marble", **COMMON)


def test_train_augmentation_reproducible_and_varied_by_epoch():
    dm = SyntheticDataModule(num_train=16, size=32, image_size=[32, 32], batch_size=16, val_split=0.0,
                             augment=[{"_target_": "albumentations.HorizontalFlip", "p": 0.5}])
    ref = next(iter(dm.make_dataloader(dm.train_samples, batch_size=16)))
    ref["image"] = dm.input_normalizer(ref["image"])  # eval set: uint8; augmented training set: float
    index = {p: i for i, p in enumerate(ref["path"])}

    def flips(torch_seed):
        torch.manual_seed(torch_seed)  # plays no part: each item's draws are seeded by (seed, epoch, index)
        out = []
        for epoch in range(2):
            loader = dm.train_dataloader()
            loader.sampler.set_epoch(epoch)  # as Lightning does before each epoch
            b = next(iter(loader))
            out.append({p: torch.equal(b["image"][j], ref["image"][index[p]].flip(-1)) for j, p in enumerate(b["path"])})
        return out

    first, second = flips(0), flips(1)
    assert first == second
    assert 0 < sum(first[0].values()) < 16 and first[0] != first[1]
