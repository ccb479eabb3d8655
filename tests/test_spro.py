"""AU-sPRO (MVTec LOCO AD): the streaming figure equals the official procedure (binarise at every
threshold, saturate each region, average, integrate against the FPR) computed here from scratch."""

import json

import numpy as np
import pytest
import torch
from PIL import Image


def official_auspro(maps, regions, limit):
    """The dataset's evaluation, directly: maps [(H,W)], regions [[(bool mask, saturation area)]]
    per image; FPR over the pixels outside every region, sPRO averaged over all regions."""
    union = [np.any([m for m, _ in r], axis=0) if r else np.zeros(a.shape, bool) for a, r in zip(maps, regions)]
    normal = np.concatenate([a[~u] for a, u in zip(maps, union)])
    found = [(a[m], s) for a, r in zip(maps, regions) for m, s in r]
    fpr, spro = [0.0], [0.0]
    for t in np.unique(np.concatenate([a.ravel() for a in maps]))[::-1]:
        fpr.append(float(np.mean(normal >= t)))
        spro.append(float(np.mean([min(np.sum(v >= t) / s, 1.0) for v, s in found])))
    x, y = np.array(fpr), np.array(spro)
    k = int(np.searchsorted(x, limit, side="right"))
    xs, ys = list(x[:k]), list(y[:k])
    if k < x.size:
        xs.append(limit)
        ys.append(y[k - 1] + (y[k] - y[k - 1]) * (limit - x[k - 1]) / (x[k] - x[k - 1]))
    xs, ys = np.array(xs), np.array(ys)
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2) / limit)


def _saturation(area, threshold, relative):
    return max(int(threshold * area), 1) if relative else min(threshold, area)


def _random_set(seed, n_good=3, n_bad=5, h=12, w=14):
    """Maps with tied scores, and anomalous images with 1-3 (possibly overlapping) box regions,
    each relative or absolute."""
    rng = np.random.default_rng(seed)
    maps, regions, labels = [], [], []
    for i in range(n_good + n_bad):
        maps.append(np.round(rng.random((h, w)) * 20) / 20)
        labels.append(int(i >= n_good))
        image_regions = []
        for _ in range(rng.integers(1, 4) if i >= n_good else 0):
            m = np.zeros((h, w), bool)
            y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
            m[y:y + rng.integers(1, 5), x:x + rng.integers(1, 6)] = True
            if rng.random() < 0.5:
                image_regions.append((m, float(rng.choice([0.1, 0.5, 1.0])), True))
            else:
                image_regions.append((m, int(rng.integers(1, 8)), False))
            maps[-1][m] += rng.random() * 0.5  # defects score higher, by an amount per region
        regions.append(image_regions)
    return maps, regions, labels


def _packed(maps, regions):
    from adtrain.data.regions import MAX_REGIONS

    code = torch.zeros(len(maps), *maps[0].shape, dtype=torch.int64)
    frac = torch.zeros(len(maps), MAX_REGIONS, dtype=torch.float64)
    for i, rs in enumerate(regions):
        for r, (m, thr, rel) in enumerate(rs):
            code[i] |= torch.from_numpy(m).long() << r
            frac[i, r] = _saturation(int(m.sum()), thr, rel) / m.sum()
    return code, frac


@pytest.mark.parametrize("exact_pixels", [1 << 20, 0])  # held and counted exactly / through the bins
def test_streaming_auspro_equals_the_official_procedure(exact_pixels):
    from adtrain.metrics.spro import SPRO_FPR_LIMITS, SproAccumulator

    maps, regions, labels = _random_set(0)
    code, frac = _packed(maps, regions)
    defects = ["good" if lab == 0 else ("logical" if i % 2 else "structural") for i, lab in enumerate(labels)]
    acc = SproAccumulator({"c": ["logical", "structural"]}, exact_pixels=exact_pixels)
    amap = torch.from_numpy(np.stack(maps)).float()
    for rows in ([0, 4, 5], [1, 2, 3, 6, 7]):  # two batches
        acc.update(amap[rows], torch.tensor(labels)[rows], code[rows], frac[rows], ["c"] * len(rows),
                   [defects[i] for i in rows])
    got = acc.compute()
    assert got["exact"] and got["regions"] == sum(len(r) for r in regions) and got["regions_lost"] == 0
    for defect in ("logical", "structural"):
        keep = [i for i, d in enumerate(defects) if d in ("good", defect)]
        sub_maps = [maps[i].astype(np.float32).astype(np.float64) for i in keep]
        sub_regions = [[(m, _saturation(int(m.sum()), t, r)) for m, t, r in regions[i]] for i in keep]
        for limit in SPRO_FPR_LIMITS:
            want = official_auspro(sub_maps, sub_regions, limit)
            assert got["by_category"]["c"][defect][f"{limit:g}"] == pytest.approx(want, abs=1e-9), (defect, limit)
    mean = got["by_category"]["c"]["mean"]["0.05"]
    assert mean == pytest.approx((got["by_category"]["c"]["logical"]["0.05"] +
                                  got["by_category"]["c"]["structural"]["0.05"]) / 2)
    assert got["mean"]["0.05"] == mean and got["fpr_limits"] == list(SPRO_FPR_LIMITS)


def test_saturation_makes_a_region_count_as_found_once_enough_of_it_is():
    from adtrain.metrics.spro import spro_weights

    scores = np.array([0.9, 0.1, 0.5, 0.7, 0.3])
    code = np.array([1, 1, 1, 1, 3])  # region 0: all five pixels; region 1: the last one
    w, regions, lost = spro_weights(scores, code, np.array([0.4, 1.0, 0.5]))  # region 2 has no pixel here
    assert (regions, lost) == (2, 1)
    # region 0 saturates at 2 of its 5 pixels: its two best (0.9, 0.7) take 1/2 each; region 1 is its pixel
    assert w.tolist() == pytest.approx([0.5, 0.0, 0.0, 0.5, 1.0])
    w, _, _ = spro_weights(scores, code & 1, np.array([0.5]))  # s = 2.5: 0.4, 0.4, 0.2
    assert w.tolist() == pytest.approx([0.4, 0.0, 0.2, 0.4, 0.0])


def test_region_files_and_defects_config_are_read_with_clear_errors(tmp_path):
    from adtrain.data.regions import load_defects_config, read_regions
    from adtrain.errors import DataError

    cfg_path = tmp_path / "defects_config.json"
    cfg_path.write_text(json.dumps([
        {"defect_name": "missing", "pixel_value": 255, "saturation_threshold": 0.5, "relative_saturation": True},
        {"defect_name": "extra", "pixel_value": 254, "saturation_threshold": 10, "relative_saturation": False}]))
    config = load_defects_config(cfg_path)
    folder = tmp_path / "000"
    folder.mkdir()
    a, b = np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)
    a[:3, :3], b[4:, 4:6] = 255, 254  # 9 pixels, relative 0.5 -> 4; 8 pixels, absolute 10 -> all 8
    Image.fromarray(a).save(folder / "000.png")
    Image.fromarray(b).save(folder / "001.png")
    (m0, f0), (m1, f1) = read_regions(folder, config, cfg_path)
    assert m0.sum() == 9 and f0 == pytest.approx(4 / 9) and m1.sum() == 8 and f1 == 1.0
    b[0, 7] = 200
    Image.fromarray(b).save(folder / "001.png")
    with pytest.raises(DataError, match="exactly one defect pixel value, found 200, 254") as e:
        read_regions(folder, config, cfg_path)
    assert e.value.path == str(folder / "001.png")
    b[0, 7] = 0
    Image.fromarray(np.where(b > 0, 7, 0).astype(np.uint8)).save(folder / "001.png")
    with pytest.raises(DataError, match="pixel value 7 is not listed in .*defects_config.json"):
        read_regions(folder, config, cfg_path)
    for bad, what in (([{"pixel_value": 1}], "expected pixel_value, saturation_threshold"),
                      ([{"pixel_value": 300, "saturation_threshold": 1, "relative_saturation": False}], "1..255"),
                      ([{"pixel_value": 3, "saturation_threshold": 2.0, "relative_saturation": True}], r"\(0, 1\]"),
                      ({"a": 1}, "list of defect entries")):
        cfg_path.write_text(json.dumps(bad))
        with pytest.raises(DataError, match=what) as e:
            load_defects_config(cfg_path)
        assert e.value.path == str(cfg_path)


@pytest.mark.parametrize("size,crop,resolution", [(48, None, "run"), (40, 32, "run"), (40, 32, "source")])
def test_a_loco_run_reports_the_official_auspro_of_its_maps(size, crop, resolution, base_cfg, tmp_path, monkeypatch):
    """At the files' own size; resized and cropped; the same maps brought back to the files' size
    (metrics.resolution=source: MVTec's evaluation, the regions as the files have them)."""
    import cv2

    from adtrain.data.testing import write_mvtec_tree
    from adtrain.metrics import evaluator as ev_module
    from adtrain.report import run_table
    from adtrain.run import run

    root = write_mvtec_tree(tmp_path / "loco", "c1", layout="mvtec_loco", n_train=10, n_test_good=3,
                            defects={"logical_anomalies": 3, "structural_anomalies": 2}, n_val=4, size=48)
    seen = []
    original = ev_module.AnomalyEvaluator.update_pixels

    def record(self, anomaly_map, label, *args, **kw):
        if getattr(self, "spro", None) is not None and anomaly_map is not None:  # the test: its maps, in order
            seen.extend(anomaly_map.detach().float().reshape(-1, *anomaly_map.shape[-2:]).numpy())
        return original(self, anomaly_map, label, *args, **kw)

    monkeypatch.setattr(ev_module.AnomalyEvaluator, "update_pixels", record)
    if resolution == "source":  # the model's own maps, at its input size, before they are brought back
        from adtrain.metrics import source_resolution

        original_updates = source_resolution.update_at_source

        def record_updates(evaluator, anomaly_map, *args):
            seen.extend(anomaly_map[:, 0].detach().float().numpy().copy())
            return original_updates(evaluator, anomaly_map, *args)

        monkeypatch.setattr(ev_module.AnomalyEvaluator, "update_pixels", original)
        monkeypatch.setattr(source_resolution, "update_at_source", record_updates)
    cfg = base_cfg("data=mvtec_loco", f"data.root={root}", "data.category=c1", "data.num_workers=0",
                   "method=patchcore", f"method.center_crop={[crop, crop] if crop else 'null'}",
                   f"method.image_size=[{size},{size}]", f"metrics.resolution={resolution}")
    res = run(cfg, tmp_path / "run")
    got = res["auspro"]
    assert sorted(got["by_category"]["c1"]) == ["logical_anomalies", "mean", "structural_anomalies"]
    config = {e["pixel_value"]: e for e in json.loads((root / "c1" / "defects_config.json").read_text())}
    from adtrain.build import build_datamodule

    samples = build_datamodule(cfg).test_samples
    assert len(seen) == len(samples)
    for defect in ("logical_anomalies", "structural_anomalies"):
        maps, regions = [], []
        for amap, s in zip(seen, samples):
            if s.defect not in ("good", defect):
                continue
            if resolution == "source":  # the crop back in its place (its border at the map's minimum), bilinear
                frame = np.full((size, size), amap.min(), np.float32)
                m = (size - crop) // 2
                frame[m:m + crop, m:m + crop] = amap
                amap = torch.nn.functional.interpolate(torch.from_numpy(frame)[None, None], size=(48, 48),
                                                       mode="bilinear", align_corners=False)[0, 0].numpy()
            maps.append(amap.astype(np.float64))
            rs = []
            if s.mask_path is not None:
                for f in sorted((root / "c1" / "ground_truth" / defect / s.mask_path.rsplit("/", 1)[-1]).glob("*.png")):
                    arr = np.asarray(Image.open(f))
                    e = config[int(arr.max())]
                    sat = _saturation(int((arr > 0).sum()), e["saturation_threshold"], e["relative_saturation"])
                    if resolution == "source":  # the file as it is
                        rs.append((arr > 0, sat))
                        continue
                    # at the run's size: nearest-neighbour resize, the centre crop, the same share saturating
                    region = cv2.resize((arr > 0).astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0
                    if crop:
                        m = (size - crop) // 2
                        region = region[m:m + crop, m:m + crop]
                    if region.any():
                        rs.append((region, sat / (arr > 0).sum() * region.sum()))
            regions.append(rs)
        for limit in (0.05, 0.3):
            want = official_auspro(maps, regions, limit)
            assert got["by_category"]["c1"][defect][f"{limit:g}"] == pytest.approx(want, abs=1e-9), (defect, limit)
    rows = {r[0]: r[1] for r in run_table(res, tmp_path)[2]}
    assert rows["AU-sPRO (FPR 0.05)"] == f"{got['mean']['0.05']:.4f}" and "  AU-sPRO, logical_anomalies" in rows
    saved = json.loads((next((tmp_path / "run").rglob("results.json"))).read_text())
    assert saved["auspro"] == got
    from adtrain.loggers import log_test_outputs

    class Logger:  # any Lightning logger: the scalars it is given
        def log_metrics(self, scalars):
            self.scalars = scalars

        def save(self):
            pass

    logger = Logger()
    log_test_outputs(logger, res, [], [], None)
    assert logger.scalars["test/auspro/c1/logical_anomalies/0.05"] == got["by_category"]["c1"]["logical_anomalies"]["0.05"]
    assert logger.scalars["test/auspro/mean/0.3"] == got["mean"]["0.3"]


def test_a_bad_defects_config_fails_before_training(base_cfg, tmp_path):
    from adtrain.data.testing import write_mvtec_tree
    from adtrain.errors import DataError
    from adtrain.run import run

    root = write_mvtec_tree(tmp_path / "loco", "c1", layout="mvtec_loco", n_val=3)
    (root / "c1" / "defects_config.json").write_text("[{")
    cfg = base_cfg("data=mvtec_loco", f"data.root={root}", "data.category=c1", "data.num_workers=0",
                   "method=patchcore", "method.center_crop=null", "method.image_size=[32,32]")
    with pytest.raises(DataError, match="cannot read the defects config") as e:
        run(cfg, tmp_path / "run")
    assert e.value.path == str(root / "c1" / "defects_config.json")
    assert not list((tmp_path / "run").rglob("*.ckpt"))  # nothing was fitted


def test_no_auspro_without_a_defects_config_and_ddp_replays_it():
    import tempfile

    from adtrain.data.mvtec_loco import MVTecLOCODataModule
    from adtrain.data.testing import write_mvtec_tree
    from adtrain.distributed import RecordingEvaluator
    from adtrain.metrics import AnomalyEvaluator

    with tempfile.TemporaryDirectory() as d:
        write_mvtec_tree(d, "c1", layout="mvtec_loco", defects_config=False)
        dm = MVTecLOCODataModule(root=d, category="c1", image_size=32, num_workers=0)
        dm.setup()
        dm.test_regions = True  # as adtrain.engine sets it for a test with AU-sPRO
        assert dm.spro_groups() == {} and "spro_code" not in next(iter(dm.test_dataloader()))
    maps, regions, labels = _random_set(1)
    code, frac = _packed(maps, regions)
    amap = torch.from_numpy(np.stack(maps)).float()[:, None]
    masks = (code != 0).float()[:, None]
    defects = ["good" if lab == 0 else "logical" for lab in labels]
    groups = {"c": ["logical"]}
    plain = AnomalyEvaluator(spro_groups=groups)
    plain.update_pixels(amap, torch.tensor(labels), masks, None, None, (code, frac, ["c"] * 8, defects))
    rec = RecordingEvaluator(lambda: AnomalyEvaluator(spro_groups=groups))
    for idx in ([5, 6, 7, 0], [1, 2, 3, 4]):  # out of order, as ranks deliver them
        rec.next_index = torch.tensor(idx)
        rec.update_pixels(amap[idx], torch.tensor(labels)[idx], masks[idx], None, None,
                          (code[idx], frac[idx], ["c"] * 4, [defects[i] for i in idx]))
    assert rec.merged().compute_spro() == plain.compute_spro() is not None
    assert AnomalyEvaluator().compute_spro() is None
