"""The MVTec AD family's other releases (MPDD, BTAD, MVTec LOCO AD, MVTec 3D-AD's RGB images, MVTec AD 2)
and Real-IAD, each read from a small tree in its own layout through its Hydra config; the official
validation splits; per-defect figures and decisions at the threshold in a run's results."""

import hashlib
import json
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from adtrain.data import (BTADDataModule, MPDDDataModule, MVTec3DDataModule, MVTecAD2DataModule, MVTecDataModule,
                          MVTecLOCODataModule)
from adtrain.data import download as dl
from adtrain.data.image_io import read_mask
from adtrain.data.testing import write_mvtec_tree
from adtrain.errors import ConfigError, DataError
from tests.conftest import compose

# data config -> (class, the tree's layout, official validation split)
CASES = {
    "mpdd": (MPDDDataModule, "mvtec", False),
    "btad": (BTADDataModule, "btad", False),
    "mvtec_loco": (MVTecLOCODataModule, "mvtec_loco", True),
    "mvtec_3d": (MVTec3DDataModule, "mvtec_3d", True),
    "mvtec_ad2": (MVTecAD2DataModule, "mvtec_ad2", True),
}


def _tree(tmp_path, layout, category="c1", **kw):
    kw = {"n_train": 10, "n_test_good": 3, "defects": {"crack": 2, "hole": 1}, "n_val": 4, **kw}
    return write_mvtec_tree(tmp_path / layout, category, layout=layout, **kw)


def _dm(name, root, *overrides, category="c1"):
    cfg = compose(f"data={name}", f"data.root={root}", f"data.category={category}", "data.num_workers=0",
                  "method.image_size=[32,32]", "method.center_crop=null", "method.batch_size=4", *overrides)
    from adtrain.build import build_datamodule

    return build_datamodule(cfg)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_layout_reads_its_tree_through_its_config(name, tmp_path):
    cls, layout, official = CASES[name]
    root = _tree(tmp_path, layout)
    if layout == "mvtec_ad2":  # the unlabelled private test set is not read
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save((root / "c1" / "test_private").mkdir() or
                                                               root / "c1" / "test_private" / "000.png")
    if layout == "mvtec_3d":  # point clouds beside the RGB images are not images of the set
        for split in ("train/good", "test/crack"):
            (root / "c1" / split / "xyz").mkdir()
            Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "c1" / split / "xyz" / "000.tiff")
    dm = _dm(name, root)
    assert type(dm) is cls and issubclass(cls, MVTecDataModule)
    dm.setup()
    if official:  # the release's validation/good images are the held-out set, every training image kept
        assert dm.val_split == "official" and len(dm.train_samples) == 10 and len(dm.val_samples) == 4
        assert all("/validation/" in s.path for s in dm.val_samples)
    else:
        assert len(dm.train_samples) == 8 and len(dm.val_samples) == 2  # 20 % of train
    assert not any("xyz" in s.path for s in dm.train_samples + dm.val_samples)
    test = dm.test_samples
    assert not any("xyz" in s.path or "private" in s.path for s in test)
    assert sorted((s.defect, s.label) for s in test) == [("crack", 1)] * 2 + [("good", 0)] * 3 + [("hole", 1)]
    assert all(s.mask_path for s in test if s.label == 1)
    batch = next(iter(dm.make_dataloader(test, batch_size=len(test))))
    assert batch["image"].shape == (6, 3, 32, 32)
    for i, label in enumerate(batch["label"].tolist()):
        assert bool(batch["mask"][i].sum() > 0) == bool(label) and batch["has_mask"][i]


def test_loco_mask_is_the_union_of_its_region_files_and_each_file_keys_the_cache(tmp_path):
    root = _tree(tmp_path, "mvtec_loco")
    sample = next(s for s in _dm("mvtec_loco", root).test_samples if s.label == 1)
    folder = root / "c1" / "ground_truth" / sample.defect / "000"
    assert sample.mask_path == str(folder)
    parts = [read_mask(folder / f) for f in ("000.png", "001.png")]
    union = read_mask(folder)
    assert parts[0].any() and parts[1].any() and not (parts[0] & parts[1]).any()
    assert np.array_equal(union, parts[0] | parts[1])
    from adtrain.data.image_cache import _stat

    before = _stat(folder)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(folder / "001.png")  # a region file changes
    assert _stat(folder) != before and len(before) == 2
    odd = folder / "002.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(odd)
    with pytest.raises(DataError, match="mask size 16x16 differs") as e:
        read_mask(folder, (32, 32), sample.path)
    assert e.value.path == str(odd)
    from adtrain.data.file_checks import _problems

    assert [err.path for err in _problems([sample], with_masks=True)] == [str(odd)]


def test_official_split_only_where_a_release_has_one_and_the_fraction_still_works(tmp_path):
    root = _tree(tmp_path, "mvtec")
    with pytest.raises(ConfigError, match="data.val_split.*own validation normals"):
        _dm("mpdd", root, "data.val_split=official")
    with pytest.raises(ConfigError, match="data.val_split.*'official', got 'half'"):
        _dm("mpdd", root, "data.val_split=half")
    loco = _dm("mvtec_loco", _tree(tmp_path, "mvtec_loco"), "data.val_split=0.3")
    loco.setup()
    assert len(loco.val_samples) == 3 and not any("/validation/" in s.path for s in loco.val_samples)
    empty = _tree(tmp_path / "e", "mvtec_3d", n_val=0)
    with pytest.raises(DataError, match="validation folder not found") as e:
        _dm("mvtec_3d", empty).setup()
    assert e.value.path.endswith("c1/validation/good/rgb")


def test_missing_ground_truth_and_layout_errors_name_the_file(tmp_path):
    root = _tree(tmp_path, "mvtec_3d")
    (root / "c1" / "test" / "hole" / "gt" / "000.png").unlink()
    with pytest.raises(DataError, match="ground-truth mask missing") as e:
        _ = _dm("mvtec_3d", root).test_samples
    assert e.value.path == str(root / "c1" / "test" / "hole" / "gt" / "000.png")
    loco = _tree(tmp_path, "mvtec_loco")
    (root_gt := loco / "c1" / "ground_truth" / "hole" / "000" / "000.png").unlink()
    (root_gt.parent / "001.png").unlink()
    root_gt.parent.rmdir()
    with pytest.raises(DataError, match="ground-truth folder missing") as e:
        _ = _dm("mvtec_loco", loco).test_samples
    assert e.value.path == str(root_gt.parent)
    with pytest.raises(DataError, match=r"category folder not found.*BTAD's: 01, 02, 03") as e:
        _dm("btad", _tree(tmp_path, "btad"), category="02").setup()
    assert e.value.path.endswith("btad/02")


def test_btad_reads_bmp_and_names_numeric_categories_as_released(tmp_path):
    root = _tree(tmp_path, "btad", category="01")
    dm = _dm("btad", root, category="01")
    assert dm.categories == ["01"] and _dm("btad", root, category="1").categories == ["01"]
    assert BTADDataModule(root=str(root), category=[1, "03"]).categories == ["01", "03"]
    assert BTADDataModule(root=str(root), category=1).category == "01"
    from adtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="names 01 twice") as e:  # one product: every image was loaded twice
        BTADDataModule(root=str(root), category=[1, "01"])
    assert e.value.key == "data.category"
    dm.setup()
    assert all(s.path.endswith(".bmp") for s in dm.train_samples)
    assert {s.mask_path.rsplit("/", 2)[-2] for s in dm.test_samples if s.label} == {"crack", "hole"}
    from omegaconf import OmegaConf

    from adtrain.engine import _category

    # results.json and the table name the released folder, not the number typed
    assert _category(OmegaConf.create({"data": {"category": 1}}), _dm("btad", root, category="1")) == "01"
    assert _category(OmegaConf.create({"data": {"category": [1, "03"]}}),
                     BTADDataModule(root=str(root), category=[1, "03"])) == ["01", "03"]
    mask = next(s.mask_path for s in dm.test_samples if s.label)
    os.unlink(mask)
    with pytest.raises(DataError, match="ground-truth mask missing .*looked for") as e:
        _ = _dm("btad", root, category="01").test_samples
    assert e.value.path == mask.rsplit(".", 1)[0] + ".png"  # BTAD's own name, not MVTec's <stem>_mask.png
    assert BTADDataModule(root=str(root), category="03")._mask_name("03", "0001") == "0001.bmp"  # 03's masks
    with pytest.raises(DataError, match=r"<category>/train/ok/\*.bmp \(01, 03\) or \*.png \(02\)"):
        _dm("btad", tmp_path / "none", category="01").setup()  # the release's own extensions named


def test_a_dataset_without_a_download_address_says_where_to_get_it(tmp_path):
    with pytest.raises(DataError, match="cannot be downloaded automatically.*github.com/stepanje/MPDD"):
        _dm("mpdd", tmp_path / "none", "data.download=true").setup()
    with pytest.raises(DataError, match="MVTec LOCO AD root folder not found.*MVTEC_LOCO_ROOT.*mvtec-loco"):
        _dm("mvtec_loco", tmp_path / "none").setup()


def _zip(tmp_path, members: dict[str, bytes]):
    archive = tmp_path / "btad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return archive, hashlib.sha256(archive.read_bytes()).hexdigest()


def test_btad_download_extracts_the_sha256_checked_zip(tmp_path, monkeypatch):
    src = _tree(tmp_path, "btad", category="01")
    files = {f"BTech_Dataset_transformed/{p.relative_to(src)}": p.read_bytes() for p in src.rglob("*") if p.is_file()}
    archive, sha = _zip(tmp_path, files)
    monkeypatch.setattr(BTADDataModule, "archive", dl.ArchiveSpec("BTAD", "https://example.invalid/btad.zip", sha,
                                                                  "btad.zip"))
    monkeypatch.setattr(dl, "fetch_url", lambda url, dest: dest.write_bytes(archive.read_bytes()))
    root = tmp_path / "data"
    dm = _dm("btad", root, "data.download=true", category="01")
    dm.setup()
    assert len(dm.train_samples) + len(dm.val_samples) == 10
    assert sorted(p.name for p in root.iterdir()) == ["01"]  # unwrapped, archive removed


def test_zip_members_outside_the_folder_are_refused(tmp_path):
    archive, sha = _zip(tmp_path, {"01/train/ok/000.png": b"x", "../evil.txt": b"x"})
    with pytest.raises(DataError, match="refusing to extract member '../evil.txt'"):
        dl.extract_archive(archive, tmp_path / "root")
    assert not (tmp_path / "evil.txt").exists() and list((tmp_path / "root").iterdir()) == []
    with pytest.raises(DataError, match="checksum mismatch \\(sha256"):
        dl.verify_checksum(archive, "0" * 64)
    dl.verify_checksum(archive, sha)


def test_loco_run_reports_each_defect_type(base_cfg, tmp_path):
    from adtrain.run import run

    root = write_mvtec_tree(tmp_path / "loco", "c1", layout="mvtec_loco", n_train=10, n_test_good=4, n_val=3,
                            defects={"logical_anomalies": 2, "structural_anomalies": 2}, size=48)
    cfg = base_cfg("data=mvtec_loco", f"data.root={root}", "data.category=c1", "data.num_workers=0",
                   "method=patchcore", "method.center_crop=null", "method.image_size=[48,48]")
    res = run(cfg, tmp_path / "run")
    assert res["data"] == "mvtec_loco" and res["num_val"] == 3 and res["num_train"] == 10
    by = res["image_auroc_by_defect"]
    assert sorted(by) == ["logical_anomalies", "structural_anomalies"]
    assert all(0.0 <= v <= 1.0 for v in by.values()) and res["pixel_auroc"] is not None
    from adtrain.report import run_table

    shown = {r[0]: r[1] for r in run_table(res, tmp_path / "run")[2]}
    assert shown["  image AUROC, logical_anomalies"] == f"{by['logical_anomalies']:.4f}"
    # each defect's AUROC is its images against every normal test image
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "scores.csv")))
    normals = [float(r["score"]) for r in rows if r["label"] == "0"]
    logical = [float(r["score"]) for r in rows if r["defect"] == "logical_anomalies"]
    wins = sum((a > n) + 0.5 * (a == n) for a in logical for n in normals)
    assert by["logical_anomalies"] == pytest.approx(wins / (len(logical) * len(normals)))
    # the decisions at the validation threshold, counted from the same rows
    at = res["test_at_threshold"]
    above = [(float(r["score"]) > res["threshold"], r["label"] == "1") for r in rows]
    assert (at["tp"], at["fp"], at["fn"]) == (sum(a and y for a, y in above), sum(a and not y for a, y in above),
                                              sum(y and not a for a, y in above))
    assert at["tp"] + at["fp"] + at["tn"] + at["fn"] == len(rows) == 8
    assert at["recall"] == pytest.approx(at["tp"] / 4) and at["false_alarm_rate"] == pytest.approx(at["fp"] / 4)
    assert shown["defects caught at threshold"] == f"{at['recall']:.4f}"


def test_realiad_reads_its_split_file_and_refuses_paths_outside_the_root(tmp_path):
    from adtrain.data import RealIADDataModule
    from adtrain.data.testing import write_realiad_tree

    root = write_realiad_tree(tmp_path / "riad", "audiojack", n_train=10, n_test_ok=3,
                              defects={"AK": 2, "QS": 1}, train_ng=2)
    dm = _dm("realiad", root, category="audiojack")
    assert type(dm) is RealIADDataModule
    dm.setup()
    assert len(dm.train_samples) + len(dm.val_samples) == 10  # the 2 defective training entries left out
    test = dm.test_samples
    assert sorted((s.defect, s.label) for s in test) == [("AK", 1)] * 2 + [("QS", 1)] + [("good", 0)] * 3
    batch = next(iter(dm.make_dataloader(test, batch_size=len(test))))
    assert [bool(m.sum() > 0) for m in batch["mask"]] == [bool(v) for v in batch["label"].tolist()]
    kept = _dm("realiad", root, "data.train_anomalies=include", category="audiojack")
    kept.setup()
    assert len(kept.train_samples) + len(kept.val_samples) == 12
    assert all(s.label == 0 for s in kept.train_samples + kept.val_samples)
    with pytest.raises(ConfigError, match="data.resolution"):
        _dm("realiad", root, "data.resolution=300", category="audiojack")
    # a split file that lists a path outside data.root is refused, naming the file
    split = root / "realiad_jsons" / "realiad_jsons" / "audiojack.json"
    meta = json.loads(split.read_text())
    meta["test"][0]["image_path"] = "../../../../etc/passwd"
    split.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="outside data.root") as e:
        _ = _dm("realiad", root, category="audiojack").test_samples
    assert e.value.path == str(split)
    with pytest.raises(DataError, match="split file not found \\('nope' is not a Real-IAD category\\)"):
        _dm("realiad", root, category="nope").setup()
    # the images on another disk, reached through a link inside data.root, still read
    linked = write_realiad_tree(tmp_path / "linked", "audiojack", n_train=5, n_test_ok=1)
    (linked / "realiad_256").rename(tmp_path / "elsewhere")
    (linked / "realiad_256").symlink_to(tmp_path / "elsewhere")
    assert len(_dm("realiad", linked, category="audiojack").test_samples) == 3


def test_realiad_paths_start_at_the_split_files_prefix_and_its_normal_class_is_normal(tmp_path):
    """The split file's "meta": entries' paths start at realiad_<res>/<meta.prefix> (the category, in the
    release; absent or empty: the category too), and meta.normal_class names the normal entries; a prefix
    that climbs out of data.root is refused, naming the file."""
    from adtrain.data.testing import write_realiad_tree

    root = write_realiad_tree(tmp_path / "riad", "audiojack", n_train=6, n_test_ok=2, defects={"AK": 2})
    split = root / "realiad_jsons" / "realiad_jsons" / "audiojack.json"
    listed = json.loads(split.read_text())
    (root / "realiad_256" / "audiojack").rename(root / "realiad_256" / "moved")
    for entries in (listed["train"], listed["test"]):
        for e in entries:
            e["anomaly_class"] = {"OK": "GOOD"}.get(e["anomaly_class"], e["anomaly_class"])
    split.write_text(json.dumps({**listed, "meta": {"prefix": "moved", "normal_class": "GOOD"}}))
    test = _dm("realiad", root, category="audiojack").test_samples
    assert sorted((s.defect, s.label) for s in test) == [("AK", 1)] * 2 + [("good", 0)] * 2
    assert all("/realiad_256/moved/" in s.path for s in test)
    for meta in ({"normal_class": "GOOD"}, {"prefix": "", "normal_class": "GOOD"}):  # the category's folder
        split.write_text(json.dumps({**listed, "meta": meta}))
        with pytest.raises(DataError, match="not found") as e:
            _ = _dm("realiad", root, category="audiojack").test_samples
        assert "/realiad_256/audiojack/" in str(e.value.path)
    split.write_text(json.dumps({**listed, "meta": {"prefix": "../../x"}}))
    with pytest.raises(DataError, match="outside data.root") as e:
        _ = _dm("realiad", root, category="audiojack").test_samples
    assert e.value.path == str(split)


def test_realiad_split_file_in_either_folder_and_views_held_out_together(tmp_path, caplog):
    """The release's zip unpacks its split files to realiad_jsons/realiad_jsons/ or realiad_jsons/ (the
    official README's): data.json_path=null finds either. The held-out normals are whole samples: no
    view of a held-out object stays in training (the threshold is fitted on objects never seen)."""
    from adtrain.data.testing import write_realiad_tree

    root = write_realiad_tree(tmp_path / "riad", n_train=10, n_test_ok=2, defects={"AK": 2}, views=5,
                              json_dir="realiad_jsons")
    dm = _dm("realiad", root, category="audiojack")
    dm.setup()
    train = {dm.sample_group(s.path) for s in dm.train_samples}
    val = {dm.sample_group(s.path) for s in dm.val_samples}
    assert len(train) == 8 and len(val) == 2 and not train & val  # 20 % of the 10 samples, all 5 views each
    assert len(dm.train_samples) == 40 and len(dm.val_samples) == 10
    assert _dm("realiad", root, "data.seed=1", category="audiojack").val_samples != dm.val_samples  # seeded
    with caplog.at_level("WARNING", logger="adtrain"):
        assert sum(s.label for s in dm.test_samples) == 2
    assert not [r for r in caplog.records if "no mask" in r.getMessage()]  # every defective view has its mask
    (root / "realiad_jsons" / "audiojack.json").rename(root / "elsewhere.json")
    with pytest.raises(DataError, match="split file not found, nor .*realiad_jsons/audiojack.json; data.json_path") as e:
        _dm("realiad", root, category="audiojack").setup()
    assert e.value.path == str(root / "realiad_jsons" / "realiad_jsons" / "audiojack.json")
    assert len(_dm("realiad", root, "data.json_path=elsewhere.json", category="audiojack").train_samples) == 40


def test_realiad_sample_auroc_scores_each_sample_by_its_views_highest_score(tmp_path):
    from adtrain.data import RealIADDataModule
    from adtrain.data.testing import write_realiad_tree
    from adtrain.metrics.image import auroc, sample_auroc

    root = write_realiad_tree(tmp_path / "riad", n_train=4, n_test_ok=3, defects={"AK": 2}, views=3)
    dm = RealIADDataModule(root=str(root), category="audiojack")
    test = dm.test_samples
    assert len(test) == 15 and sum(s.label for s in test) == 2  # 5 samples of 3 views; a defect seen in one
    groups = {dm.sample_group(s.path) for s in test}
    assert len(groups) == 5
    rng = np.random.default_rng(0)
    rows = [{"path": s.path, "label": s.label, "score": float(rng.random())} for s in test]
    best = {}
    for r in rows:  # by hand: a sample's highest view score, defective if any view is
        key = dm.sample_group(r["path"])
        best[key] = (max(best.get(key, (-1, 0))[0], r["score"]), max(best.get(key, (-1, 0))[1], r["label"]))
    expected = auroc([v[0] for v in best.values()], [v[1] for v in best.values()])
    assert sample_auroc(rows, dm.sample_group) == expected
    assert sample_auroc(rows, lambda path: None) is None  # every image its own sample


def test_realiad_run_reports_sample_auroc(base_cfg, tmp_path):
    from adtrain.data.testing import write_realiad_tree
    from adtrain.report import run_table
    from adtrain.run import run

    root = write_realiad_tree(tmp_path / "riad", n_train=8, n_test_ok=3, defects={"AK": 2}, views=2, size=48)
    cfg = base_cfg("data=realiad", f"data.root={root}", "data.category=audiojack", "data.num_workers=0",
                   "method=patchcore", "method.center_crop=null", "method.image_size=[48,48]")
    res = run(cfg, tmp_path / "run")
    assert res["num_test"] == 10 and 0.0 <= res["sample_auroc"] <= 1.0
    assert dict((r[0], r[1]) for r in run_table(res, "RUN")[2])["sample AUROC (views)"] == f"{res['sample_auroc']:.4f}"
