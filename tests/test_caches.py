"""The decoded-image cache (data.cache) and the frozen-backbone feature cache (feature_cache)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from adtrain.data.testing import write_mvtec_tree

KEYS = ("image", "label", "mask", "has_mask", "category", "defect", "path", "source_size")


def _dm(root, cache, cache_dir, augment=None, resize="pil_bilinear", max_gb=20.0):
    from adtrain.data.mvtec import MVTecDataModule

    return MVTecDataModule(root=str(root), category="widget", image_size=[40, 36], center_crop=[32, 32],
                           batch_size=4, num_workers=0, seed=0, augment=augment, val_anomalies=None,
                           cache=cache, cache_dir=str(cache_dir), resize=resize, cache_max_gb=max_gb)


def _items(ds, seed=0):
    torch.manual_seed(seed)  # the train set draws its augmentation seeds from torch's RNG
    return [ds[i] for i in range(len(ds))]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in KEYS:
            if isinstance(x[k], torch.Tensor):
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


@pytest.fixture
def tree(tmp_path):
    # images of a size other than image_size, masks on the anomalies, one defect without ground truth
    return write_mvtec_tree(tmp_path / "mvtec", "widget", n_train=6, n_test_good=2, defects={"crack": 3},
                            defects_without_gt={"hole": 1}, size=50)


@pytest.mark.parametrize("rule", ["pil_bilinear", "pil_lanczos", "cv2_linear"])
def test_cached_tensors_bit_identical_to_uncached_cold_and_warm(tree, tmp_path, rule):
    flip = [{"_target_": "albumentations.HorizontalFlip", "p": 0.5},
            {"_target_": "albumentations.ColorJitter", "p": 0.5}]
    off, on = _dm(tree, "off", tmp_path / "c", flip, rule), _dm(tree, "auto", tmp_path / "c", flip, rule)
    for train, samples in ((True, off.train_samples), (False, off.test_samples)):
        ref = _items(off.make_dataset(samples, train=train))
        cold = on.make_dataset(samples, train=train)
        assert cold.cached is not None
        _same(ref, _items(cold))
        _same(ref, _items(on.make_dataset(samples, train=train)))  # warm: served from the entry
    assert on.image_cache.events == ["miss", "hit", "miss", "hit"]
    assert on.image_cache.state() == "miss" and off.image_cache.state() == "off"
    test = _items(on.make_dataset(on.test_samples))
    assert any(x["mask"].any() for x in test) and not all(bool(x["has_mask"]) for x in test)
    assert all(x["source_size"].tolist() == [50, 50] for x in test)
    warm = _dm(tree, "auto", tmp_path / "c", resize=rule)  # another job: every set already there
    warm.make_dataset(warm.test_samples)
    assert warm.image_cache.state() == "hit"
    assert not list((tmp_path / "c").glob(".*.tmp"))  # built in a temp folder, renamed into place


def test_key_is_the_same_in_another_process(tree):
    import subprocess
    import sys

    from adtrain.data.image_cache import cache_key

    dm = _dm(tree, "off", tree)
    ds = dm.make_dataset(dm.train_samples)
    code = ("import sys; from adtrain.data.mvtec import MVTecDataModule as M; from adtrain.data.image_cache import "
            "cache_key; d = M(root=sys.argv[1], category='widget', image_size=[40, 36], val_anomalies=None); "
            "s = d.make_dataset(d.train_samples); print(cache_key(s.samples, s.loader, (40, 36)))")
    out = subprocess.run([sys.executable, "-c", code, str(tree)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == cache_key(ds.samples, ds.loader, (40, 36))


def test_changed_or_touched_file_gets_a_new_entry(tree, tmp_path):
    dm = _dm(tree, "auto", tmp_path / "c")
    samples = dm.train_samples
    first = _items(dm.make_dataset(samples))
    path = samples[0].path
    Image.fromarray(np.full((50, 50, 3), 7, np.uint8)).save(path)  # rewritten: new pixels
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = _items(dm.make_dataset(samples))
    assert not torch.equal(first[0]["image"], changed[0]["image"])
    _same(changed, _items(_dm(tree, "off", tmp_path / "c").make_dataset(samples)))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))  # touched only: not trusted either
    dm.make_dataset(samples)
    assert dm.image_cache.events == ["miss", "miss", "miss"]
    assert len([p for p in (tmp_path / "c").iterdir() if not p.name.startswith(".")]) == 3


def test_a_file_rewritten_with_its_mtime_put_back_gets_a_new_entry(tree, tmp_path):
    """The same size and mtime (an uncompressed PNG of the same size rewritten in place, its mtime
    restored with utime, as rsync -a or a careless script leaves it): the old pixels were served."""
    dm = _dm(tree, "auto", tmp_path / "c")
    samples = dm.train_samples
    path = samples[0].path
    Image.fromarray(np.full((50, 50, 3), 10, np.uint8)).save(path, compress_level=0)
    first = _items(dm.make_dataset(samples))
    st = os.stat(path)
    Image.fromarray(np.full((50, 50, 3), 240, np.uint8)).save(path, compress_level=0)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    again = _items(dm.make_dataset(samples))
    assert dm.image_cache.events == ["miss", "miss"] and not torch.equal(first[0]["image"], again[0]["image"])
    _same(again, _items(_dm(tree, "off", tmp_path / "c").make_dataset(samples)))


def test_an_entry_left_without_meta_json_is_rebuilt_and_evicted_not_blocking(tree, tmp_path, monkeypatch):
    """A deletion cut short after meta.json went: the key's folder blocked every later build (the
    rename onto it failed) and escaped the budget for good. Entries are now deleted renamed away
    first; a folder left so by an older version is deleted and rebuilt, or evicted."""
    from adtrain.data import image_cache

    dm = _dm(tree, "auto", tmp_path / "c")
    folder = dm.make_dataset(dm.train_samples).cached.folder
    (folder / "meta.json").unlink()
    ds = dm.make_dataset(dm.train_samples)
    assert dm.image_cache.events == ["miss", "miss"] and ds.cached is not None and (folder / "meta.json").is_file()
    dm.make_dataset(dm.train_samples)
    assert dm.image_cache.events[-1] == "hit"
    _same(_items(ds), _items(_dm(tree, "off", tmp_path / "c").make_dataset(dm.train_samples)))
    (folder / "meta.json").unlink()  # and evict() deletes such a folder rather than skipping it
    monkeypatch.setattr(image_cache, "_IN_USE", set())
    dm.image_cache.evict()
    assert not folder.exists() and not [p for p in (tmp_path / "c").iterdir()]


def test_a_new_run_releases_the_entries_an_earlier_run_in_this_process_opened(tree, tmp_path, monkeypatch):
    """A sequential sweep runs every job in one process: entries opened by its first job were never
    evicted by the later ones, whatever the budget. run() releases them (past RECENT_S they go)."""
    from adtrain.data import image_cache

    monkeypatch.setattr(image_cache, "_IN_USE", set())
    dm = _dm(tree, "auto", tmp_path / "c")
    old = dm.make_dataset(dm.train_samples).cached.folder
    entry = sum(f.stat().st_size for f in old.iterdir())
    os.utime(old / "meta.json", (1e9, 1e9))  # last used long ago
    budget = 1.5 * entry / 2**30  # one entry fits, not two
    image_cache.release_entries()  # what adtrain.run.run does first
    other = _dm(tree, "auto", tmp_path / "c", resize="cv2_linear", max_gb=budget)
    other.make_dataset(other.train_samples)
    assert not old.exists()


def test_a_damaged_entry_is_rebuilt_and_a_deleted_one_keeps_serving(tree, tmp_path, caplog):
    """An entry cut short (a full disk, a killed copy) is decoded again, not trusted; an entry
    deleted while a run reads it keeps serving that run (its arrays are mapped when it opens)."""
    import logging
    import shutil

    dm = _dm(tree, "auto", tmp_path / "c")
    ref = _items(dm.make_dataset(dm.train_samples))
    entry = next(p for p in (tmp_path / "c").iterdir() if not p.name.startswith("."))
    with open(entry / "images.npy", "r+b") as f:
        f.truncate(200)
    with caplog.at_level(logging.WARNING, logger="adtrain"):
        rebuilt = dm.make_dataset(dm.train_samples)
    assert dm.image_cache.events == ["miss", "miss"] and "unreadable" in caplog.text
    _same(ref, _items(rebuilt))
    served = dm.make_dataset(dm.train_samples)
    shutil.rmtree(entry)
    _same(ref, _items(served))


@pytest.mark.parametrize("meta", ["{}", "[]", '{"source_size": [], "has_mask": []}', '{"source_size": 1}'])
def test_an_entry_whose_meta_json_lacks_its_lists_is_rebuilt(tree, tmp_path, caplog, meta):
    """meta.json of valid JSON without the per-image lists (or with lists of another length than the
    arrays) is a damaged entry, decoded again as a truncated images.npy is: not a KeyError from inside."""
    import logging

    dm = _dm(tree, "auto", tmp_path / "c")
    ref = _items(dm.make_dataset(dm.train_samples))
    entry = next(p for p in (tmp_path / "c").iterdir() if not p.name.startswith("."))
    (entry / "meta.json").write_text(meta)
    with caplog.at_level(logging.WARNING, logger="adtrain"):
        rebuilt = dm.make_dataset(dm.train_samples)
    assert dm.image_cache.events == ["miss", "miss"] and f"image cache entry {entry} unreadable" in caplog.text
    _same(ref, _items(rebuilt))
    again = _dm(tree, "auto", tmp_path / "c")
    again.make_dataset(again.train_samples)
    assert again.image_cache.events == ["hit"]  # the rebuilt entry is whole


def test_each_resize_rule_has_its_own_entry(tree, tmp_path):
    """The rule is part of the key: a changed data.resize never serves another rule's images."""
    from adtrain.data.image_cache import cache_key
    from adtrain.data.resize import RULES, resize_image

    off = _dm(tree, "off", tmp_path / "c")
    samples = off.train_samples
    ds = off.make_dataset(samples)
    assert len({cache_key(samples, ds.loader, (40, 36), rule) for rule in RULES}) == len(RULES)
    made = {}
    for rule in RULES:
        dm = _dm(tree, "auto", tmp_path / "c", resize=rule)
        entry = dm.make_dataset(samples).cached
        assert dm.image_cache.events == ["miss"], rule
        made[rule] = entry.get(0)[0]
        source = np.asarray(Image.open(samples[0].path).convert("RGB"))
        assert np.array_equal(made[rule], resize_image(source, (40, 36), rule)), rule
    assert not np.array_equal(made["pil_bilinear"], made["cv2_linear"])
    again = _dm(tree, "auto", tmp_path / "c", resize="cv2_linear")
    again.make_dataset(samples)
    assert again.image_cache.events == ["hit"]


def test_bad_cache_value_names_the_key(tree, tmp_path):
    from adtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="data.cache"):
        _dm(tree, "sometimes", tmp_path / "c")
    for bad in (0, -1, "lots"):
        with pytest.raises(ConfigError, match="data.cache_max_gb"):
            _dm(tree, "auto", tmp_path / "c", max_gb=bad)


def test_image_cache_budget_deletes_least_recently_used_entries_not_in_use(tree, tmp_path, monkeypatch, caplog):
    """data.cache_max_gb: after an entry is written, the least recently used others go until the
    folder fits; an entry this process opened, or another used within RECENT_S, stays; an entry
    larger than the whole budget is not written (decoded as with the cache off)."""
    import logging

    from adtrain.data import image_cache

    cache = tmp_path / "c"
    dm = _dm(tree, "auto", cache)
    old, recent = dm.make_dataset(dm.train_samples).cached.folder, dm.make_dataset(dm.test_samples).cached.folder
    entry = sum(f.stat().st_size for f in old.iterdir())
    os.utime(old / "meta.json", (1e9, 1e9))  # used long ago
    monkeypatch.setattr(image_cache, "_IN_USE", set())  # as another process sees them
    monkeypatch.setattr(image_cache, "RECENT_S", 0.0)
    budget = 2.5 * entry / 2**30  # two entries fit, not three
    other = _dm(tree, "auto", cache, resize="cv2_linear", max_gb=budget)
    new = other.make_dataset(other.train_samples).cached.folder
    assert other.image_cache.events == ["miss"]
    assert not old.exists() and recent.is_dir() and new.is_dir()  # the oldest went, the newest is in use

    monkeypatch.setattr(image_cache, "_IN_USE", {str(new.resolve())})
    monkeypatch.setattr(image_cache, "RECENT_S", 3600.0)  # `recent` was used a moment ago: kept
    third = _dm(tree, "auto", cache, resize="pil_lanczos", max_gb=budget)
    with caplog.at_level(logging.WARNING, logger="adtrain"):
        third.make_dataset(third.train_samples)
    assert recent.is_dir() and new.is_dir() and "in use" in caplog.text
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 3

    tiny = _dm(tree, "auto", tmp_path / "t", max_gb=0.5 * entry / 2**30)
    ds = tiny.make_dataset(tiny.train_samples)
    assert ds.cached is None and tiny.image_cache.events == ["skip"]
    assert not (tmp_path / "t").exists() or not list((tmp_path / "t").iterdir())
    _same(_items(_dm(tree, "off", tmp_path / "c").make_dataset(tiny.train_samples)), _items(ds))


def test_run_results_identical_with_caches_on_and_off(fast_cfg, tmp_path):
    from adtrain.run import run

    base = ["method=patchcore", "backbone=resnet18", "backbone.pretrained=false", "method.image_size=[64,64]",
            "method.center_crop=null", "output.heatmaps=0", "data.num_test_normal=6", "data.num_test_anomalous=6",
            f"paths.cache_dir={tmp_path / 'cache'}"]
    off = run(fast_cfg(*base, "data.cache=off"), tmp_path / "off")
    cold = run(fast_cfg(*base, "feature_cache=on"), tmp_path / "cold")
    warm = run(fast_cfg(*base, "feature_cache=on"), tmp_path / "warm")
    assert (off["image_cache"], off["feature_cache"]) == ("off", "off")
    assert (cold["image_cache"], cold["feature_cache"]) == ("miss", "miss")
    assert (warm["image_cache"], warm["feature_cache"]) == ("hit", "hit")
    assert warm["feature_cache_lookups"]["miss"] == 0 and warm["feature_cache_lookups"]["hit"] > 0
    keys = ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro", "val_image_auroc", "threshold")
    assert [off[k] for k in keys] == [cold[k] for k in keys] == [warm[k] for k in keys]
    scores = [(tmp_path / d / "scores.csv").read_text() for d in ("off", "cold", "warm")]
    assert scores[0] == scores[1] == scores[2]  # every image's score, bit for bit


def _extractor():
    from adtrain.backbones import build_extractor

    cfg = {"name": "resnet18", "pretrained": False, "stages": {"layer1": 1, "layer2": 2}}
    return build_extractor(cfg, ["layer1"], frozen=True)


def test_feature_cache_hit_is_bit_identical_and_keyed_on_the_input(tmp_path):
    from adtrain.backbones.feature_cache import FeatureCache

    ext = _extractor()
    x = torch.randn(2, 3, 32, 32)
    ref = ext(x)
    ext.feature_cache = FeatureCache(tmp_path / "f")
    cold, warm = ext(x), ext(x.clone())
    assert (ext.feature_cache.misses, ext.feature_cache.hits) == (1, 1)
    assert torch.equal(ref["layer1"], cold["layer1"]) and torch.equal(ref["layer1"], warm["layer1"])
    y = x.clone()
    y[0, 0, 0, 0] += 1e-6  # one value differs: another key
    ext(y)
    assert ext.feature_cache.misses == 2 and ext.feature_cache.state() == "miss"


@pytest.mark.parametrize("other", [
    {"mean": [0.2, 0.2, 0.2], "std": [0.9, 0.9, 0.9]},  # against 0.5 / 0.5: only "a conversion" was keyed
    {"output_stride": 8},  # timm kwargs: dilations instead of strides, the same weights
    {"stages": {"layer2": 1, "layer3": 3}},  # layer2 taken at another stage (the same network)
])
def test_feature_cache_never_serves_another_extractors_features(tmp_path, other):
    """Two frozen extractors with the same weights and layer names that compute other features: the
    second got the first's tensors (wrong values, or another shape) while its key missed these settings."""
    from adtrain.backbones.extractor import FeatureExtractor
    from adtrain.backbones.feature_cache import FeatureCache

    def make(stages=None, **kw):
        torch.manual_seed(1)
        stages = stages or {"layer2": 2, "layer3": 3}
        kw = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], **kw}
        return FeatureExtractor("resnet18", stages, ["layer2", "layer3"], pretrained=False, frozen=True, **kw)

    cache = FeatureCache(tmp_path / "f")
    x = torch.randn(2, 3, 32, 32)
    first, second = make(), make(**other)
    assert weights_equal(first, second)
    first.feature_cache = second.feature_cache = cache
    first(x)
    for layer in ("layer2", "layer3"):
        got, want = second(x)[layer], second.extract(x)[layer]
        assert got.shape == want.shape and torch.equal(got, want), layer
    assert cache.hits == 1  # its own entry (the second call), never the first extractor's


def weights_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _random_bytes(path):
    import random

    path.write_bytes(random.Random(0).randbytes(200))  # torch: UnpicklingError "Unsupported operand"


def _empty(path):
    path.write_bytes(b"")  # EOFError


def _other_layout(path):
    torch.save(torch.zeros(3), path)  # loads fine (weights-only), yet is no entry of this cache


@pytest.mark.parametrize("damage", [_random_bytes, _empty, _other_layout])
def test_a_damaged_feature_cache_entry_is_named_deleted_and_recomputed(tmp_path, caplog, damage):
    """An entry overwritten, cut short or of another layout: a warning naming the file, the features
    computed again (bit for bit the extractor's) and stored whole; not a traceback from torch.load."""
    import logging

    from adtrain.backbones.feature_cache import SUFFIX, FeatureCache

    ext = _extractor()
    x = torch.randn(2, 3, 32, 32)
    ref = ext(x)
    ext.feature_cache = FeatureCache(tmp_path / "f")
    ext(x)
    path = tmp_path / "f" / (ext.feature_cache.key(ext, x) + SUFFIX)
    damage(path)
    with caplog.at_level(logging.WARNING, logger="adtrain"):
        again = ext(x)
    assert f"feature cache entry {path} unreadable" in caplog.text
    assert "weights_only" not in caplog.text  # not torch's advice to load it unsafely
    assert (ext.feature_cache.misses, ext.feature_cache.hits) == (2, 0)
    assert torch.equal(again["layer1"], ref["layer1"])
    assert torch.equal(ext(x)["layer1"], ref["layer1"]) and ext.feature_cache.hits == 1  # stored again, whole


def test_feature_cache_budget_evicts_least_recently_used(tmp_path):
    from adtrain.backbones.feature_cache import SUFFIX, FeatureCache

    ext = _extractor()
    xs = [torch.full((1, 3, 32, 32), float(i)) for i in range(4)]
    entry = sum(v.numel() * 4 for v in ext.extract(xs[0]).values())
    ext.feature_cache = FeatureCache(tmp_path / "f", max_gb=2.5 * entry / 2**30)  # room for two entries
    cache = ext.feature_cache
    for i in (0, 1):
        ext(xs[i])
        os.utime(tmp_path / "f" / (cache.key(ext, xs[i]) + SUFFIX), ns=(i + 1, i + 1))  # xs[0] the oldest
    ext(xs[1])  # a hit refreshes xs[1]
    ext(xs[2])  # over budget: the least recently used (xs[0]) goes
    assert len(list((tmp_path / "f").glob("*" + SUFFIX))) == 2
    hits = ext.feature_cache.hits
    ext(xs[2])
    ext(xs[1])
    assert ext.feature_cache.hits == hits + 2
    ext(xs[0])
    assert ext.feature_cache.misses == 4


def test_unwritable_cache_dir_falls_back_to_decoding(tree, tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    dm = _dm(tree, "auto", blocker / "images")
    ds = dm.make_dataset(dm.train_samples)
    # said apart from data.cache=off: asked for, but the folder took nothing
    assert ds.cached is None and dm.image_cache.state() == "skipped" and "not writable" in caplog.text
    _same(_items(ds), _items(_dm(tree, "off", blocker).make_dataset(dm.train_samples)))


def test_an_unwritable_feature_cache_is_said_once_and_reported(tmp_path, caplog):
    """14 "cannot store" warnings in a 24-image run (one per batch), and results.json's feature_cache "miss"."""
    import logging

    from adtrain.backbones.feature_cache import FeatureCache

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cache = FeatureCache(blocker / "f", max_gb=1)

    class Ext:
        name, kind, layers, channels_last, _renorm = "toy", "cnn", ["layer1"], False, False
        _weights_digest = _settings_digest = "x"

        def extract(self, x):
            return {"layer1": x * 2}

    with caplog.at_level(logging.WARNING, logger="adtrain"):
        for i in range(5):
            out = cache(Ext(), torch.full((1, 3, 4, 4), float(i)))
            assert torch.equal(out["layer1"], torch.full((1, 3, 4, 4), 2.0 * i))
    assert caplog.text.count("cannot store features") == 1 and cache.state() == "unwritable"


def test_too_little_disk_skips_the_cache_before_writing(tree, tmp_path, caplog, monkeypatch):
    """A full disk must never reach the memory map (a write there is SIGBUS, not an exception)."""
    import collections

    import adtrain.data.image_cache as ic

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(ic.shutil, "disk_usage", lambda p: usage(10**9, 10**9, ic.HEADROOM_BYTES // 2))
    dm = _dm(tree, "auto", tmp_path / "images")
    ds = dm.make_dataset(dm.train_samples)
    assert ds.cached is None and dm.image_cache.events == ["skip"] and "GB free" in caplog.text
    assert not any((tmp_path / "images").iterdir())  # nothing written, not even a temp folder
    _same(_items(ds), _items(_dm(tree, "off", tmp_path / "off").make_dataset(dm.train_samples)))


def test_refused_reservation_falls_back_and_leaves_no_partial_entry(tree, tmp_path, caplog, monkeypatch):
    """Free space can vanish between the check and the write (another job): the reservation
    fails with ENOSPC, the run decodes as before and no partial entry is left behind."""
    import errno

    import adtrain.data.image_cache as ic

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ic.os, "posix_fallocate", full, raising=False)
    dm = _dm(tree, "auto", tmp_path / "images")
    ds = dm.make_dataset(dm.train_samples)
    assert ds.cached is None and dm.image_cache.events == ["skip"] and "No space left" in caplog.text
    assert not any((tmp_path / "images").iterdir())


def test_reserved_entry_is_allocated_and_reads_back(tmp_path):
    from adtrain.data.image_cache import _open_reserved

    a = _open_reserved(tmp_path / "a.npy", (3, 8, 8, 3))
    a[1] = 7
    a.flush()
    del a
    b = np.load(tmp_path / "a.npy")
    assert b.shape == (3, 8, 8, 3) and b.dtype == np.uint8 and int(b.sum()) == 7 * 8 * 8 * 3
    assert os.stat(tmp_path / "a.npy").st_blocks * 512 >= b.nbytes  # blocks allocated, not sparse


def test_many_damaged_entries_are_named_a_few_times_then_summed_up_in_one_line(tmp_path, caplog):
    """A cache folder full of damaged entries (a full disk, a bad copy): the first WARNED_BROKEN named
    in a warning each, then one line for the rest, not one warning per entry; each is still deleted."""
    import logging

    from adtrain.cache_files import WARNED_BROKEN, load_entry

    folder = tmp_path / "cache"
    folder.mkdir()
    paths = [folder / f"{i}.pt" for i in range(WARNED_BROKEN + 4)]
    for p in paths:
        p.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="adtrain"):
        assert all(load_entry(p, "feature cache entry") is None for p in paths)
    named = [r for r in caplog.records if "unreadable (" in r.getMessage()]
    assert [r.getMessage().split()[3] for r in named] == [str(p) for p in paths[:WARNED_BROKEN]]
    rest = [r for r in caplog.records if r.getMessage().startswith("more unreadable entries in")]
    assert len(rest) == 1 and str(folder) in rest[0].getMessage()
    assert not any(p.exists() for p in paths)
