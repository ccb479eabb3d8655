"""Anomaly maps as files for a benchmark's server (MVTec AD 2's private test sets): raw float16 maps
at each image's own size and {0, 255} decision masks at the run's threshold, in the server's layout."""

import numpy as np
import pytest
from PIL import Image


def _private_sets(root, category="c1", n=3, size=(40, 56)):
    """MVTec AD 2's unlabelled test sets: <cat>/test_private/NNN_regular.png, test_private_mixed/NNN_mixed.png."""
    rng = np.random.default_rng(5)
    for split, suffix in (("test_private", "regular"), ("test_private_mixed", "mixed")):
        folder = root / category / split
        folder.mkdir(parents=True)
        for i in range(n):
            img = (100 + 20 * rng.standard_normal((*size, 3))).clip(0, 255).astype(np.uint8)
            img[5:12, 8:20] = 250 if i == 1 else img[5:12, 8:20]
            Image.fromarray(img).save(folder / f"{i:03d}_{suffix}.png")
    if n > 2:  # one image at the run's own size (before the centre crop)
        Image.fromarray(np.zeros((36, 36, 3), np.uint8)).save(root / category / "test_private" / "002_regular.png")


def test_predict_writes_the_ad2_servers_files_from_the_raw_maps(base_cfg, tmp_path):
    import tifffile

    from adtrain.data.testing import write_mvtec_tree
    from adtrain.inference.detector import Detector
    from adtrain.inference.map_files import to_source_size
    from adtrain.predict import predict
    from adtrain.run import run

    root = write_mvtec_tree(tmp_path / "ad2", "c1", layout="mvtec_ad2", n_train=10, n_test_good=3,
                            defects={"bad": 3}, n_val=4, size=32)
    _private_sets(root)
    cfg = base_cfg("data=mvtec_ad2", f"data.root={root}", "data.category=c1", "data.num_workers=0",
                   "method=patchcore", "method.center_crop=[32,32]", "method.image_size=[36,36]")
    res = run(cfg, tmp_path / "run")
    ckpt = next((tmp_path / "run").rglob("model.ckpt"))
    out = tmp_path / "submission"
    predict(str(ckpt), f"{root}/c1/test_private*/*.png", out=str(out), anomaly_maps=True, heatmaps=False,
            relative_to=str(root))
    assert sorted(p.name for p in out.iterdir()) == ["anomaly_images", "anomaly_images_thresholded", "predictions.csv"]
    tiffs = sorted(p.relative_to(out / "anomaly_images").as_posix() for p in (out / "anomaly_images").rglob("*.tiff"))
    assert tiffs == [f"c1/test_private/{i:03d}_regular.tiff" for i in range(3)] + \
        [f"c1/test_private_mixed/{i:03d}_mixed.tiff" for i in range(3)]
    detector = Detector.load(ckpt)
    # the pixel threshold: the threshold quantile of the held-out normals' map maxima (not the image threshold)
    from adtrain.build import build_datamodule

    dm = build_datamodule(cfg)
    dm.setup()
    peaks = detector.predict([s.path for s in dm.val_samples]).raw_maps.max(axis=(1, 2))
    thr = float(detector.method.pixel_threshold)
    assert res["pixel_threshold"] == thr and thr == pytest.approx(np.quantile(peaks.astype(np.float64), 0.99), rel=1e-6)
    assert thr != pytest.approx(float(detector.threshold), rel=1e-3)
    decided = res["pixel_test_at_threshold"]  # the labelled test set's pixels decided at it
    assert decided["threshold"] == thr and decided["tp"] + decided["fp"] + decided["fn"] + decided["tn"] == 6 * 32 * 32
    rows = {r[0]: r[1] for r in __import__("adtrain.report", fromlist=["run_table"]).run_table(res, tmp_path)[2]}
    assert rows["pixel F1 at threshold"] == (f"{decided['f1']:.4f}" if decided["f1"] is not None else "-")
    for name in tiffs:
        source = root / name.replace(".tiff", ".png")
        w, h = Image.open(source).size
        got = tifffile.imread(out / "anomaly_images" / name)
        mask = np.asarray(Image.open(out / "anomaly_images_thresholded" / name.replace(".tiff", ".png")))
        assert got.dtype == np.float16 and got.shape == (h, w) and mask.shape == (h, w)
        assert set(np.unique(mask)) <= {0, 255}
        raw = detector.predict(str(source)).raw_maps[0]  # the model's own map at its input size (32x32)
        assert raw.shape == (32, 32)
        want = to_source_size(raw, detector.pre, (h, w))
        assert np.array_equal(got, want.astype(np.float16))
        assert np.array_equal(mask == 255, want > thr)
        if (h, w) == (36, 36):  # the run's size: the model's map itself in the crop's place, its minimum around
            assert np.array_equal(got[2:34, 2:34], raw.astype(np.float16))
            assert (got[:2] == raw.min().astype(np.float16)).all() and (got[:, 34:] == got[0, 0]).all()
        else:  # bilinear: within the map's range
            assert raw.min() - 1e-6 <= want.min() and want.max() <= raw.max() + 1e-6
    # the display maps (heatmaps) put 0.5 at the same pixel threshold, not at the image threshold
    assert detector.map_threshold == thr
    shown = detector.predict([str(root / n.replace(".tiff", ".png")) for n in tiffs])
    clear = np.abs(shown.raw_maps - thr) > 1e-5 * abs(thr)
    assert clear.mean() > 0.99 and (shown.raw_maps > thr).any()
    assert np.array_equal((shown.maps > 0.5)[clear], (shown.raw_maps > thr)[clear])
    bright = tifffile.imread(out / "anomaly_images" / "c1/test_private/001_regular.tiff").astype(np.float32)
    assert bright[5:12, 8:20].mean() > bright.mean()  # the bright patch scores where it is
    # a second category's call adds its files and leaves these
    (root / "c2").mkdir()
    _private_sets(root, "c2", n=1)
    predict(str(ckpt), f"{root}/c2/test_private/*.png", out=str(out), anomaly_maps=True, heatmaps=False,
            relative_to=str(root))
    assert len(list((out / "anomaly_images").rglob("*.tiff"))) == 7


def test_map_files_crop_names_and_float16_range(tmp_path):
    from adtrain.errors import AdtrainError, DataError
    from adtrain.inference.graph import Preprocessing
    from adtrain.inference.map_files import relative_names, to_source_size, write_map_files

    import albumentations as A

    pre = Preprocessing((9, 8), (4, 5), (0.5,) * 3, (0.5,) * 3, "pil_bilinear")  # odd margins, not square
    raw = np.arange(20, dtype=np.float32).reshape(4, 5) + 1
    frame = to_source_size(raw, pre, (9, 8))  # the crop back in its place, the border at the lowest value
    where = A.CenterCrop(4, 5)(image=np.arange(72).reshape(9, 8))["image"]  # which pixels the crop kept
    assert np.array_equal(frame.ravel()[where.ravel()], raw.ravel())
    assert (np.delete(frame.ravel(), where.ravel()) == 1).all()
    assert to_source_size(raw, pre, (16, 12)).shape == (16, 12)
    a, b = tmp_path / "r" / "x" / "1.png", tmp_path / "r" / "y" / "2.png"
    assert [n.as_posix() for n in relative_names([str(a), str(b)], tmp_path / "r")] == ["x/1", "y/2"]
    assert [n.as_posix() for n in relative_names([str(a), str(b)], None)] == ["x/1", "y/2"]
    with pytest.raises(DataError, match="is not below relative_to") as e:
        relative_names([str(a)], tmp_path / "elsewhere")
    assert e.value.path == str(a)
    with pytest.raises(AdtrainError, match="beyond float16") as e:
        write_map_files(tmp_path / "out", relative_names([str(a)], tmp_path / "r")[0], np.full((4, 4), 1e6), 1.0)
    assert "x/1.tiff" in str(e.value) and not list((tmp_path / "out").rglob("*.tiff"))


def test_the_evaluator_counts_pixel_decisions_at_the_pixel_threshold():
    import torch

    from adtrain.distributed import RecordingEvaluator
    from adtrain.metrics import AnomalyEvaluator

    g = torch.Generator().manual_seed(3)
    maps = torch.rand(5, 1, 6, 7, generator=g)
    masks = (torch.rand(5, 1, 6, 7, generator=g) > 0.7).float()
    labels = torch.tensor([0, 1, 1, 0, 1])
    masks[labels == 0] = 0
    has = torch.tensor([True, True, False, True, True])  # image 2: defective, no ground truth: left out
    ev = AnomalyEvaluator(pixel_threshold=0.6)
    ev.update_pixels(maps, labels, masks, has)
    got = ev.compute_pixels_at_threshold()
    m, gt = maps[has, 0].numpy(), masks[has, 0].numpy() > 0.5
    tp, fp, fn = int(((m > 0.6) & gt).sum()), int(((m > 0.6) & ~gt).sum()), int(((m <= 0.6) & gt).sum())
    assert (got["tp"], got["fp"], got["fn"], got["tn"]) == (tp, fp, fn, 4 * 42 - tp - fp - fn)
    assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn)) and got["recall"] == pytest.approx(tp / (tp + fn))
    rec = RecordingEvaluator(lambda: AnomalyEvaluator(pixel_threshold=0.6))  # DDP: replayed, the same counts
    for idx in ([3, 4], [0, 1, 2]):
        rec.next_index = torch.tensor(idx)
        rec.update_pixels(maps[idx], labels[idx], masks[idx], has[idx])
    assert rec.merged().compute_pixels_at_threshold() == got
    assert AnomalyEvaluator().compute_pixels_at_threshold() is None
    empty = AnomalyEvaluator(pixel_threshold=0.6)  # no defect pixel at all: recall and F1 undefined, not 0
    empty.update_pixels(maps, labels, torch.zeros_like(masks), has)
    none = empty.compute_pixels_at_threshold()
    assert none["fp"] > 0 and none["precision"] == 0.0 and none["recall"] is None and none["f1"] is None


def test_pixel_decisions_need_a_fitted_one_task_model(base_cfg):
    import torch

    from adtrain.build import build_method

    method = build_method(base_cfg("data=synthetic", "method=patchcore", "method.image_size=[32,32]",
                                   "method.center_crop=null"))
    assert not method.pixel_decisions  # nothing fitted yet
    method.pixel_threshold.fill_(0.3)
    assert method.pixel_decisions
    method.task_memories = [{}, {}]  # a continual run's memories of two tasks: each image routed to its own
    assert not method.pixel_decisions
    state = {k: v for k, v in method.state_dict().items() if k != "pixel_threshold"}  # a checkpoint from before
    method.load_state_dict(state)
    assert torch.isnan(method.pixel_threshold)
