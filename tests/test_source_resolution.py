"""metrics.resolution=source: the test's pixel metrics on each map brought back to its image's own
size (a centre crop's border at the map's lowest value, bilinear), against the ground-truth files as
they are; checked here against the same procedure written with OpenCV and scikit-learn."""

import numpy as np
import pytest
import torch
from PIL import Image


def test_maps_to_source_is_opencv_bilinear_around_the_crop():
    import albumentations as A
    import cv2

    from adtrain.metrics.source_resolution import maps_to_source, size_groups

    rng = np.random.default_rng(0)
    for (h, w), (sh, sw) in (((9, 8), (30, 45)), ((9, 8), (5, 4)), ((16, 16), (16, 16))):
        raw = rng.standard_normal((2, h, w)).astype(np.float32)
        got = maps_to_source(torch.from_numpy(raw), (h, w), None, (sh, sw)).numpy()
        want = np.stack([cv2.resize(r, (sw, sh), interpolation=cv2.INTER_LINEAR) for r in raw])
        np.testing.assert_allclose(got, want, atol=1e-5)
    raw = rng.standard_normal((2, 4, 5)).astype(np.float32)  # odd, unequal margins
    frame = maps_to_source(torch.from_numpy(raw), (9, 8), (4, 5), (9, 8)).numpy()
    kept = A.CenterCrop(4, 5)(image=np.arange(72).reshape(9, 8))["image"].ravel()
    for f, r in zip(frame, raw):  # each map in the crop's place, its own minimum around it
        assert np.array_equal(f.ravel()[kept], r.ravel()) and (np.delete(f.ravel(), kept) == r.min()).all()
    assert size_groups([(3, 4), (5, 5), (3, 4), (1, 1)]) == [[0, 2], [1], [3]]


def _two_sizes(tmp_path):
    """Two categories of different sizes (48 and 36 pixels) in one task: batches that mix them."""
    from adtrain.data.testing import write_mvtec_tree

    root = tmp_path / "mvtec"
    write_mvtec_tree(root, "c1", n_train=8, n_test_good=2, defects={"crack": 3}, size=48, seed=1)
    write_mvtec_tree(root, "c2", n_train=8, n_test_good=2, defects={"crack": 3}, size=36, seed=2)
    return root


def _source_run(base_cfg, root, run_dir, *extra):
    from adtrain.run import run

    cfg = base_cfg("data=mvtec", f"data.root={root}", "data.category=[c1,c2]", "data.num_workers=0",
                   "data.val_split=0.25", "method=patchcore", "method.image_size=[40,40]",
                   "method.center_crop=[32,32]", "method.batch_size=8", "metrics.resolution=source", *extra)
    return cfg, run(cfg, run_dir)


def test_a_run_at_source_resolution_scores_the_ground_truth_files_pixels(base_cfg, tmp_path, monkeypatch):
    from sklearn.metrics import average_precision_score, roc_auc_score

    from adtrain.build import build_datamodule
    from adtrain.metrics import source_resolution
    from adtrain.report import run_table

    root = _two_sizes(tmp_path)
    seen, sizes = {}, []
    original = source_resolution.update_at_source

    def record(evaluator, anomaly_map, batch, *args):  # the model's maps at its input size, by image
        sizes.append(sorted({tuple(m.shape) for m in batch["source_mask"]}))
        seen.update(zip(batch["path"], anomaly_map[:, 0].detach().float().numpy().copy()))
        return original(evaluator, anomaly_map, batch, *args)

    monkeypatch.setattr(source_resolution, "update_at_source", record)
    cfg, res = _source_run(base_cfg, root, tmp_path / "run")
    assert res["pixel_resolution"] == "source" and [(36, 36), (48, 48)] in sizes  # a batch of both sizes
    maps, truth, categories = [], [], []
    for s in build_datamodule(cfg).test_samples:
        raw = seen[s.path]
        assert raw.shape == (32, 32)
        frame = np.full((40, 40), raw.min(), np.float32)
        frame[4:36, 4:36] = raw
        size = Image.open(s.path).size[0]
        # bilinear with half-pixel centres (OpenCV's INTER_LINEAR to 1e-5, the first test; OpenCV's own
        # rounding moves this AUROC by 3e-4, as the crop's border is one block of tied scores)
        maps.append(torch.nn.functional.interpolate(torch.from_numpy(frame)[None, None], size=(size, size),
                                                    mode="bilinear", align_corners=False).numpy().ravel())
        gt = np.asarray(Image.open(s.mask_path)) > 0 if s.mask_path else np.zeros((size, size), bool)
        truth.append(gt.ravel())
        categories.append(s.category)
    flat_maps, flat_truth = np.concatenate(maps), np.concatenate(truth)
    assert res["pixel_auroc"] == pytest.approx(roc_auc_score(flat_truth, flat_maps), abs=1e-9)
    assert res["pixel_ap"] == pytest.approx(average_precision_score(flat_truth, flat_maps), abs=1e-9)
    for cat in ("c1", "c2"):  # each category's own figure, at its own size
        pick = [i for i, c in enumerate(categories) if c == cat]
        want = roc_auc_score(np.concatenate([truth[i] for i in pick]), np.concatenate([maps[i] for i in pick]))
        assert res["by_category"][cat]["pixel_auroc"] == pytest.approx(want, abs=1e-9)
    decided = res["pixel_test_at_threshold"]  # every source pixel decided once, at the pixel threshold
    assert decided["tp"] + decided["fp"] + decided["fn"] + decided["tn"] == flat_truth.size == 5 * (48 ** 2 + 36 ** 2)
    above = flat_maps > res["pixel_threshold"]
    assert (decided["tp"], decided["fp"]) == (int((above & flat_truth).sum()), int((above & ~flat_truth).sum()))
    where = {r[0]: r[2] for r in run_table(res, tmp_path)[2] if r[2] != "validation"}
    assert where["pixel AUROC, categories pooled"] == where["pixel F1 at threshold"] == "test, source size"
    assert where["image AUROC, categories pooled"] == "test"
    # the image cache off: the same maps, the same figures, bit for bit
    _, off = _source_run(base_cfg, root, tmp_path / "off", "data.cache=off")
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro", "pixel_test_at_threshold", "image_auroc"):
        assert off[key] == res[key], key
    # at the run's size (the default), the figures differ: the setting is what moved them
    from adtrain.run import run

    at_run = run(_run_cfg(cfg), tmp_path / "at_run")
    assert at_run["pixel_resolution"] == "run" and at_run["pixel_auroc"] != res["pixel_auroc"]
    assert at_run["image_auroc"] == res["image_auroc"]


def _run_cfg(cfg):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    cfg.metrics.resolution = "run"
    return cfg


def test_ddp_replays_a_test_at_source_sizes_as_one_process_counts_it():
    """A RecordingEvaluator (DDP) keeps each image small (the map at the model's size, the mask as
    bits, the region code narrowed) and replays the batches through the same updates, in the same
    order, as one process: streamed figures equal to the bit; updates cut to bounded pixels."""
    import pickle

    from adtrain.distributed import RecordingEvaluator
    from adtrain.metrics import AnomalyEvaluator
    from adtrain.metrics.source_resolution import update_at_source, update_groups

    assert update_groups([(4, 4)] * 5 + [(2, 2)], max_pixels=40) == [[0, 1], [2, 3], [4], [5]]
    assert update_groups([(9, 9)], max_pixels=40) == [[0]]  # one image over the cap: alone
    g = torch.Generator().manual_seed(0)
    geometry = ((10, 12), (8, 8))  # resized to 10 x 12, centre crop 8 x 8
    sizes = [(20, 24), (20, 24), (9, 11), (20, 24), (9, 11), (9, 11), (20, 24), (9, 11)]
    maps = torch.rand(8, 1, 8, 8, generator=g)
    masks = [(torch.rand(*s, generator=g) > 0.7).to(torch.uint8) for s in sizes]
    codes = [m.to(torch.int64) * 5 for m in masks]  # regions 0 and 2
    labels = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0])
    for i in (0, 3, 7):
        masks[i].zero_()
        codes[i].zero_()
    groups = {"c": ["crack"]}

    def batch(rows):
        return {"source_mask": [masks[i] for i in rows], "label": labels[rows], "has_mask": torch.ones(len(rows), dtype=torch.bool),
                "category": ["c"] * len(rows), "defect": ["good" if labels[i] == 0 else "crack" for i in rows],
                "source_spro_code": [codes[i] for i in rows], "spro_fraction": torch.full((len(rows), 63), 0.5),
                "index": torch.tensor(rows)}

    make = lambda: AnomalyEvaluator(exact_pixels=0, num_bins=64, pixel_threshold=0.5, spro_groups=groups)  # noqa: E731
    plain = make()
    for rows in ([0, 1, 2, 3], [4, 5, 6, 7]):
        update_at_source(plain, maps[rows], batch(rows), geometry, False, True)
    assert not plain.pixel.exact  # streamed through few bins: the updates' order and grouping count
    rec = RecordingEvaluator(make)
    for rows in ([4, 5, 6, 7], [0, 1, 2, 3]):  # a rank's batches, out of order
        rec.next_index = torch.tensor(rows)
        update_at_source(rec, maps[rows], batch(rows), geometry, False, True)
    assert all(it["code"].dtype == torch.uint8 and it["map"].shape == (1, 8, 8) for _, it in rec.items)
    assert len(pickle.dumps(rec.items[0])) < 2000  # one image's own bytes, not its batch's
    merged = rec.merged()
    assert merged.compute() == plain.compute() and merged.compute_spro() == plain.compute_spro()
    assert merged.compute_pixels_at_threshold() == plain.compute_pixels_at_threshold()


def test_metrics_resolution_is_checked(fast_cfg):
    from adtrain.build import build_method
    from adtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="metrics.resolution.*one of run, source"):
        build_method(fast_cfg("metrics.resolution=full"))
    assert build_method(fast_cfg("metrics.resolution=source")).pixel_resolution == "source"


def test_a_datasets_own_loader_gives_the_ground_truth_at_source_size(fast_cfg, tmp_path):
    """data=synthetic draws each mask with its image (no files): at source size the cached run
    reads it from the renderer, and counts every drawn defect pixel."""
    from adtrain.build import build_datamodule
    from adtrain.run import run

    cfg = fast_cfg("method=patchcore", "metrics.resolution=source", "data.size=72")
    cached = run(cfg, tmp_path / "cached")
    dm = build_datamodule(cfg)
    dm.setup()
    loader = dm.sample_loader()
    defect_pixels = sum(int(loader(s)[1].sum()) for s in dm.test_samples if s.label == 1)
    decided = cached["pixel_test_at_threshold"]
    assert defect_pixels > 0 and decided["tp"] + decided["fn"] == defect_pixels
    assert decided["tp"] + decided["fp"] + decided["fn"] + decided["tn"] == len(dm.test_samples) * 72 * 72
    assert cached["image_cache"] != "off"
    uncached = run(fast_cfg("method=patchcore", "metrics.resolution=source", "data.size=72", "data.cache=off"),
                   tmp_path / "off")
    for key in ("pixel_auroc", "pixel_aupro", "pixel_test_at_threshold"):
        assert uncached[key] == cached[key], key
    import adtrain  # a finished run tested again: at its own setting, and at the run's size on request

    again, at_run = adtrain.test(tmp_path / "off"), adtrain.test(tmp_path / "off", ["metrics.resolution=run"])
    assert again["pixel_resolution"] == "source" and again["pixel_auroc"] == pytest.approx(cached["pixel_auroc"], abs=1e-12)
    assert at_run["pixel_resolution"] == "run" and at_run["pixel_auroc"] != pytest.approx(cached["pixel_auroc"], abs=1e-6)
