"""threshold.mode=val_f1: the image threshold of the largest F1 on the validation set (held-out
normals and their synthetic anomalies), never on the test set (adtrain.methods.val_threshold)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from adtrain.errors import ConfigError
from adtrain.metrics.image import f1_max, f1_max_threshold
from tests.test_test_path import _batches, _Method


def _f1_at(cut: float, scores: np.ndarray, labels: np.ndarray) -> float:
    flagged = scores.astype(np.float32) > np.float32(cut)  # adtrain's decision: score > threshold
    tp = int((flagged & (labels == 1)).sum())
    return 2 * tp / (int(flagged.sum()) + int(labels.sum()))


@pytest.mark.parametrize("seed", range(6))
def test_deciding_above_the_threshold_gives_the_largest_f1(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    labels = (rng.random(n) < 0.4).astype(np.int64)
    labels[0] = 1
    scores = np.round(rng.normal(size=n) + labels, 1)  # rounded: many ties
    cut, f1 = f1_max_threshold(scores, labels)
    assert f1 == pytest.approx(f1_max(scores, labels)) and _f1_at(cut, scores, labels) == pytest.approx(f1)
    best = [t for t in np.unique(scores.astype(np.float32)) if _f1_at(t - 1e-3, scores, labels) == pytest.approx(f1)]
    assert (scores.astype(np.float32) > cut).sum() == min((scores.astype(np.float32) >= t).sum() for t in best)


def test_the_threshold_at_the_edges_of_float32():
    low = np.float32(1.0)
    high = np.nextafter(low, np.float32(2))  # adjacent float32 values: no midpoint between them
    cut, f1 = f1_max_threshold(np.array([low, high], np.float32), np.array([0, 1]))
    assert f1 == 1.0 and low <= np.float32(cut) < high
    cut, f1 = f1_max_threshold(np.array([3.0, 3.0, 5.0]), np.array([1, 1, 1]))  # all anomalous: flag all
    assert f1 == 1.0 and np.float32(cut) < 3.0 and np.float32(cut) == np.nextafter(np.float32(3), np.float32(0))
    assert f1_max_threshold(np.array([1.0, 2.0]), np.array([0, 0])) is None


def test_fit_threshold_takes_the_f1_cut_of_the_validation_set_and_keeps_the_centres():
    method = _Method().eval()
    normals = [{"image": b["image"]} for b in _batches(2, seed=1)]
    val = _batches(3, seed=2)
    quantile = method.fit_threshold(normals, 0.99)
    centre, pixel = float(method.score_center), float(method.pixel_threshold)
    info = method.fit_threshold(normals, 0.99, f1_dataloader=val)
    scores = torch.cat([method.anomaly_output(b["image"]).pred_score for b in val]).numpy()
    labels = torch.cat([b["label"] for b in val]).numpy()
    assert info["threshold_mode"] == "val_f1" and info["quantile_threshold"] == quantile["threshold"]
    assert info["threshold"] == float(method.threshold) == f1_max_threshold(scores, labels)[0]
    assert info["threshold_val_f1"] == pytest.approx(f1_max(scores, labels))
    assert info["num_threshold_anomalies"] == int(labels.sum()) and info["num_threshold_normals"] == labels.size - labels.sum()
    assert float(method.score_center) == centre and float(method.pixel_threshold) == pixel  # normals' as before
    no_anomaly = [{**b, "label": torch.zeros_like(b["label"])} for b in val]
    kept = method.fit_threshold(normals, 0.99, f1_dataloader=no_anomaly)  # nothing to take an F1 of: the quantile
    assert kept["threshold_mode"] == "quantile" and kept["threshold"] == quantile["threshold"]


def test_a_val_f1_threshold_below_the_normals_median_moves_the_centre_below_it(caplog):
    """Mostly anomalies in the validation set, scored as the normals are: the best F1 flags them all, a
    threshold below the normals' median. normalize() then returned the raw scores (scores.csv's
    normalized_score = score, silently); now 0.5 stays the threshold, the centre below it."""
    import logging

    method = _Method().eval()
    normals = [{"image": b["image"]} for b in _batches(2, seed=1)]
    val = _batches(2, seed=1)  # the same images, nearly all labelled anomalous
    for b in val:
        b["label"] = torch.ones_like(b["label"])
    val[0]["label"][0] = 0
    with caplog.at_level(logging.WARNING, logger="adtrain"):
        info = method.fit_threshold(normals, 0.99, f1_dataloader=val)
    thr, centre = float(method.threshold), float(method.score_center)
    assert info["threshold_mode"] == "val_f1" and thr <= info["normal_score_median"]
    assert centre < thr and info["score_center"] == centre
    assert centre == pytest.approx(thr - (info["quantile_threshold"] - info["normal_score_median"]))
    values = torch.tensor([thr, centre, thr + 1.0])
    assert method.normalize(values, method.score_center).tolist() == pytest.approx([0.5, 0.0, 0.5 + 0.5 / (thr - centre)])
    assert any("normalised scores take 0 at" in r.getMessage() for r in caplog.records)


def test_val_f1_is_checked_before_training(fast_cfg):
    from adtrain.preflight import check_config

    check_config(fast_cfg("threshold.mode=val_f1"))
    check_config(fast_cfg("threshold.mode=val_f1", "schedule=synthetic_3"))
    for overrides, said in ((["threshold.mode=f1"], "must be one of quantile, val_f1"),
                            (["threshold.mode=val_f1", "data.val_anomalies=null"], "makes none")):
        with pytest.raises(ConfigError, match=said) as err:
            check_config(fast_cfg(*overrides))
        assert err.value.key == "threshold.mode"


def test_a_run_decides_at_the_validation_sets_f1_cut(fast_cfg, tmp_path, monkeypatch):
    """End to end (PatchCore): the threshold is the F1 cut of the validation items' scores, which are
    the held-out normals and their synthetic anomalies (not a test image), and scores.csv decides with it."""
    import adtrain.methods.val_threshold as vt
    from adtrain.run import run

    seen = {}

    def recording(scores, labels):
        seen["scores"], seen["labels"] = np.array(scores), np.array(labels)
        return f1_max_threshold(scores, labels)

    monkeypatch.setattr(vt, "f1_max_threshold", recording)
    run(fast_cfg("method=patchcore", "threshold.mode=val_f1", "output.heatmaps=0"), tmp_path / "run")
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["threshold_mode"] == "val_f1" and res["threshold"] == f1_max_threshold(seen["scores"], seen["labels"])[0]
    assert res["num_threshold_anomalies"] == int(seen["labels"].sum()) > 0
    assert res["num_threshold_normals"] == res["num_threshold_images"]  # the held-out normals, and them alone
    assert res["threshold"] != res["quantile_threshold"]
    rows = list(csv.DictReader(open(tmp_path / "run" / "scores.csv")))
    assert rows and all(int(r["prediction"]) == int(np.float32(r["score"]) > np.float32(res["threshold"])) for r in rows)


def test_val_f1_without_an_anomaly_keeps_the_quantile_and_says_so(caplog):
    from omegaconf import OmegaConf

    from adtrain.engine import fit_threshold

    normals = [{"image": b["image"]} for b in _batches(2, seed=1)]

    class Data:
        def val_normal_dataloader(self):
            return normals

        def val_dataloader(self):
            return [{**b, "label": torch.zeros_like(b["label"])} for b in _batches(2, seed=2)]

    cfg = OmegaConf.create({"threshold": {"mode": "val_f1", "quantile": 0.99}})
    with caplog.at_level("WARNING", logger="adtrain"):
        info = fit_threshold(cfg, _Method().eval(), Data())
    assert info["threshold_mode"] == "quantile" and "holds no synthetic anomaly" in caplog.text


def test_a_continual_run_takes_the_f1_cut_of_every_seen_tasks_validation_set(fast_cfg, tmp_path):
    """schedule=synthetic_3 with one shared model (STFPM, schedule.threshold=seen): each task's own
    threshold is the F1 cut of its validation set, the final one that of all three tasks' validation
    sets together (held-out normals and their synthetic anomalies), never of a test image."""
    from adtrain.build import build_datamodule
    from adtrain.continual.schedule import task_config
    from adtrain.loading import load_method
    from adtrain.run import run

    tiny = ["data.num_train=20", "data.num_test_normal=4", "data.num_test_anomalous=4", "data.size=64"]
    run(fast_cfg(*tiny, "schedule=synthetic_3", "threshold.mode=val_f1", "output.heatmaps=0"), tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [p["threshold_mode"] for p in saved["per_task"]] == ["val_f1"] * 3
    final = saved["per_task"][2]
    assert final["threshold_tasks"] == [0, 1, 2]
    method, _, _ = load_method(tmp_path / saved["final_checkpoint"])
    scores, labels = [], []
    with torch.no_grad():
        for cat in ("texture", "grid", "stripes"):
            dm = build_datamodule(task_config(fast_cfg(*tiny, "schedule=synthetic_3"), [cat]))
            for b in dm.val_dataloader():
                scores.append(method.anomaly_output(b["image"]).pred_score.float())
                labels.append(b["label"])
    s, y = torch.cat(scores).numpy(), torch.cat(labels).numpy()
    assert final["num_threshold_anomalies"] == int(y.sum()) > 0 and final["num_threshold_normals"] == int((y == 0).sum())
    cut, f1 = f1_max_threshold(s, y)
    assert final["threshold"] == float(method.threshold) == pytest.approx(cut, rel=1e-5)
    assert final["threshold_val_f1"] == pytest.approx(f1)
