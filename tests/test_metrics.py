"""Tests of adtrain.metrics: hand-worked cases, sklearn agreement, streaming vs exact, memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from adtrain.errors import AdtrainError, ConfigError
from adtrain.metrics import (
    AnomalyEvaluator,
    aupro,
    auroc,
    average_precision,
    f1_max,
    image_metrics,
)
from adtrain.metrics.aupro import region_weights
from adtrain.metrics.curves import ap_from_counts

# ---------------------------------------------------------------- image metrics, by hand


def test_image_metrics_hand_worked():
    # scores 0.1 0.4 0.35 0.8, labels 0 0 1 1.
    # AUROC: pairs (pos, neg): 0.35>0.1 yes, 0.35>0.4 no, 0.8>0.1 yes, 0.8>0.4 yes -> 3/4.
    # AP, thresholds high->low: 0.8 (P=1, R=1/2), 0.4 (P=1/2, R=1/2), 0.35 (P=2/3, R=1):
    #   1/2 * 1 + 1/2 * 2/3 = 5/6.
    # F1 = 2TP/(2TP+FP+FN): 0.8 -> 2/4, 0.4 -> 2/5, 0.35 -> 4/5, 0.1 -> 4/6. Max 4/5.
    m = image_metrics([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert m["image_auroc"] == pytest.approx(0.75, abs=1e-12)
    assert m["image_ap"] == pytest.approx(5 / 6, abs=1e-12)
    assert m["image_f1max"] == pytest.approx(0.8, abs=1e-12)


def test_image_metrics_with_ties_hand_worked():
    # scores 0.2 0.5 0.5 0.9 0.3, labels 0 0 1 1 1 (a positive and a negative tie at 0.5).
    # AUROC: pos 0.5 vs {0.2, 0.5}: 1 + 1/2; pos 0.9: 2; pos 0.3: 1 -> 4.5 / 6 = 0.75.
    # AP: 0.9 (TP1 FP0, R=1/3, P=1), 0.5 (TP2 FP1, R=2/3, P=2/3), 0.3 (TP3 FP1, R=1, P=3/4):
    #   (1 + 2/3 + 3/4) / 3 = 29/36.
    # F1 = 2TP/(2TP+FP+FN): 0.9 -> 2/(2+0+2) = 1/2; 0.5 -> 4/(4+1+1) = 2/3; 0.3 -> 6/7; 0.2 -> 6/8.
    s, y = [0.2, 0.5, 0.5, 0.9, 0.3], [0, 0, 1, 1, 1]
    assert auroc(s, y) == pytest.approx(0.75, abs=1e-12)
    assert average_precision(s, y) == pytest.approx(29 / 36, abs=1e-12)
    assert f1_max(s, y) == pytest.approx(6 / 7, abs=1e-12)


def test_image_metrics_match_sklearn_on_random_ties():
    rng = np.random.default_rng(0)
    s = np.round(rng.random(300), 2)  # many ties
    y = (rng.random(300) < 0.3).astype(int)
    p, r, _ = precision_recall_curve(y, s)
    f1_sk = np.max(np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0))
    assert auroc(torch.tensor(s), torch.tensor(y)) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert average_precision(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert f1_max(s, y) == pytest.approx(f1_sk, abs=1e-12)


def test_image_metrics_single_class_is_none():
    # no normal image: AP and F1-max were 1.0 for any detector (sklearn's AP), while the log said null
    assert image_metrics([0.3, 0.7], [1, 1]) == {"image_auroc": None, "image_ap": None, "image_f1max": None}
    assert image_metrics([0.3, 0.7], [0, 1]) == {"image_auroc": 1.0, "image_ap": 1.0, "image_f1max": 1.0}
    m = image_metrics([0.3, 0.7], [0, 0])
    assert m == {"image_auroc": None, "image_ap": None, "image_f1max": None}


# ---------------------------------------------------------------- pixel metrics vs sklearn


def _random_pixel_batches(seed: int, n_batches: int = 4, b: int = 3, size: int = 24):
    """Random maps whose later batches fall outside the first batch's range, both sides."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        mask = torch.zeros(b, 1, size, size)
        for j in range(b - 1):  # last image of each batch stays normal
            r, c = torch.randint(0, size - 8, (2,), generator=g).tolist()
            h, w = torch.randint(2, 8, (2,), generator=g).tolist()
            mask[j, 0, r : r + h, c : c + w] = 1
        amap = torch.rand(b, 1, size, size, generator=g) + 0.8 * mask
        amap = amap * (1 + 2 * i) - 1.5 * i  # widens the range to the left and right
        out.append((amap, mask))
    return out


def _feed(ev: AnomalyEvaluator, batches) -> None:
    for amap, mask in batches:
        label = (mask.flatten(1).amax(1) > 0).long()
        has_mask = torch.ones(len(label), dtype=torch.bool)
        ev.update(amap.amax(dim=(1, 2, 3)), label, amap, mask, has_mask)


def test_streaming_pixel_metrics_match_sklearn():
    batches = _random_pixel_batches(1)
    ev = AnomalyEvaluator(num_bins=65536)
    _feed(ev, batches)
    assert ev.pixel.bins.exact and ev.pixel.error_bounds() == {"pixel_auroc": 0.0, "pixel_ap": 0.0, "pixel_f1max": 0.0, "pixel_aupro": 0.0}
    m = ev.compute()
    s = torch.cat([a for a, _ in batches]).numpy().ravel()
    y = torch.cat([k for _, k in batches]).numpy().ravel().astype(int)
    p, r, _ = precision_recall_curve(y, s)
    f1_sk = np.max(2 * p * r / np.maximum(p + r, 1e-300))
    # fewer distinct scores than bins: exact, whatever the range the later batches widen to
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert m["pixel_f1max"] == pytest.approx(f1_sk, abs=1e-12)
    for key, value in m.items():
        assert value is not None and 0.0 <= value <= 1.0, key


def test_coarse_bins_are_less_accurate_but_within_their_bound():
    """num_bins is honoured: 16 bins give a different AUROC, within the reported bound."""
    batches = _random_pixel_batches(2, n_batches=2)
    fine, coarse = AnomalyEvaluator(num_bins=65536), AnomalyEvaluator(num_bins=16)
    _feed(fine, batches)
    _feed(coarse, batches)
    assert len(coarse.pixel.bins) <= 16 and not coarse.pixel.bins.exact
    a_fine, a_coarse = fine.compute()["pixel_auroc"], coarse.compute()["pixel_auroc"]
    bound = coarse.pixel.error_bounds()["pixel_auroc"]
    assert a_fine != a_coarse and abs(a_fine - a_coarse) <= bound < 0.1
    # AP and F1-max stream through the same bins, within their own bounds (F1-max from below)
    assert fine.pixel.bins.exact
    exact, binned, bounds = fine.compute(), coarse.compute(), coarse.pixel.error_bounds()
    assert 0 < abs(exact["pixel_ap"] - binned["pixel_ap"]) <= bounds["pixel_ap"] < 0.2
    assert 0 <= exact["pixel_f1max"] - binned["pixel_f1max"] <= bounds["pixel_f1max"] < 0.2


@pytest.mark.parametrize("seed", range(6))
def test_binned_ap_and_f1max_are_within_their_bounds(seed):
    """The AP and F1-max bounds hold whatever order the scores take inside a bin: ties, separated
    and mixed classes, against scikit-learn on the exact scores."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    from adtrain.metrics.curves import ap_from_counts, f1max_from_counts
    from adtrain.metrics.summary import AdaptiveBins

    rng = np.random.default_rng(seed)
    n = 3000
    y = (rng.random(n) < [0.02, 0.1, 0.3, 0.5, 0.05, 0.2][seed]).astype(np.int64)
    s = rng.normal(size=n) + y * [0.5, 1.0, 2.0, 0.0, 3.0, 1.5][seed]
    if seed % 2:
        s = np.round(s, 1)  # heavy ties
    bins = AdaptiveBins(16)
    for part in np.array_split(np.arange(n), 5):
        v, inv = np.unique(s[part], return_inverse=True)
        bins.add(torch.tensor(v), torch.tensor(np.bincount(inv, weights=1 - y[part], minlength=v.size)).long(),
                 torch.tensor(np.bincount(inv, weights=y[part], minlength=v.size)).long(), torch.zeros(v.size))
    c = bins.counts
    bounds = bins.error_bounds(0, 0.3)
    p, r, _ = precision_recall_curve(y, s)
    exact_ap, exact_f1 = average_precision_score(y, s), np.max(2 * p * r / np.maximum(p + r, 1e-300))
    assert abs(ap_from_counts(c["anomalous"], c["normal"]) - exact_ap) <= bounds["pixel_ap"] + 1e-12
    assert 0 <= exact_f1 - f1max_from_counts(c["anomalous"], c["normal"]) <= bounds["pixel_f1max"] + 1e-12
    assert bounds["pixel_ap"] < 1.0


# ---------------------------------------------------------------- AUPRO, by hand


def _hand_aupro_case(tied_normals: bool):
    """Two 8x10 images: one with two defect regions, one normal (144 normal pixels in all).

    Region R1: 4 pixels on a diagonal (one region only under 8-connectivity), score 0.9.
    Region R2: rows 1-3, cols 6-9 (12 pixels); cols 6-7 score 0.7, cols 8-9 score 0.2.
    Normal pixels: 18 at 0.8; then either 18 at 0.5 (step curve) or 72 at 0.2 (tied with
    R2's low half: a sloped segment crossing FPR 0.3); the rest 0.
    """
    maps, masks = torch.zeros(2, 1, 8, 10), torch.zeros(2, 1, 8, 10)
    for k in range(1, 5):
        masks[0, 0, k, k], maps[0, 0, k, k] = 1, 0.9
    masks[0, 0, 1:4, 6:10] = 1
    maps[0, 0, 1:4, 6:8], maps[0, 0, 1:4, 8:10] = 0.7, 0.2
    flat = maps[1, 0].view(-1)
    flat[:18] = 0.8
    if tied_normals:
        flat[18:80] = 0.2
        maps[0, 0, 7, :] = 0.2  # 10 more normal pixels of the defective image: 72 in all
    else:
        flat[18:36] = 0.5
    return maps, masks


# Step case: curve (0,0) (0,.5) (.125,.5) (.125,.75) (.25,.75) (.25,1) (1,1):
#   area to 0.3 = .5*.125 + .75*.125 + 1*.05 = .20625 -> /0.3 = 0.6875.
HAND_STEP = 0.20625 / 0.3
# Tied case: (0,.5) (.125,.5) (.125,.75) then a line to (.625, 1); at 0.3 PRO = .75 + .5*.175
#   = .8375; area = .5*.125 + (.75 + .8375)/2 * .175 = .0625 + .13890625 -> /0.3.
HAND_TIED = (0.0625 + 0.13890625) / 0.3


@pytest.mark.parametrize("tied, expected", [(False, HAND_STEP), (True, HAND_TIED)])
def test_aupro_hand_computed(tied, expected):
    maps, masks = _hand_aupro_case(tied)
    assert aupro(maps, masks) == pytest.approx(expected, abs=1e-12)
    ev = AnomalyEvaluator()
    ev.update(torch.tensor([0.9, 0.8]), torch.tensor([1, 0]), maps, masks)
    assert ev.compute()["pixel_aupro"] == pytest.approx(expected, abs=1e-9)


def test_regions_are_eight_connected():
    mask = np.zeros((1, 6, 6), dtype=bool)
    mask[0, [0, 1, 2], [0, 1, 2]] = True  # diagonal: one region of 3
    mask[0, 4:6, 4:6] = True  # separate 2x2 block
    weights, n = region_weights(mask)
    assert n == 2
    np.testing.assert_allclose(np.sort(weights), [1 / 4] * 4 + [1 / 3] * 3)


def _brute_force_aupro(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    """Direct definition: loop over every distinct threshold."""
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [maps[i][lab == j] for j in range(1, n + 1)]
    normal = maps[~masks]
    fpr, pro = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fpr.append(np.mean(normal >= t))
        pro.append(np.mean([np.mean(r >= t) for r in regions]))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(zip(fpr, pro), zip(fpr[1:], pro[1:])):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_lim) / 2
            break
    return area / limit


def _random_defect_maps(seed: int, n: int, size: int, grid: float | None = None):
    g = torch.Generator().manual_seed(seed)
    noise = torch.nn.functional.avg_pool2d(torch.rand(n, 1, size, size, generator=g), 5, 1, 2)
    masks = (noise > noise.flatten(1).quantile(0.85, dim=1).view(n, 1, 1, 1)).float()
    masks[-1] = 0  # one normal image
    maps = torch.rand(n, 1, size, size, generator=g) + 0.7 * masks
    if grid is not None:
        maps = torch.round(maps / grid) * grid
    return maps, masks


def test_aupro_exact_matches_brute_force():
    maps, masks = _random_defect_maps(3, n=3, size=16, grid=0.05)
    m, k = maps[:, 0].double().numpy(), masks[:, 0].numpy() > 0.5
    for limit in (0.3, 0.05, 1.0):
        assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(
            _brute_force_aupro(m, k, limit), abs=1e-12
        )


def test_aupro_streaming_matches_exact():
    maps, masks = _random_defect_maps(4, n=12, size=32)
    maps = maps * torch.linspace(1, 4, 12).view(12, 1, 1, 1)  # later batches widen the range
    ev = AnomalyEvaluator()
    for i in range(0, 12, 4):
        ev.update(maps[i : i + 4].amax((1, 2, 3)), torch.ones(4), maps[i : i + 4], masks[i : i + 4])
    assert ev.compute()["pixel_aupro"] == pytest.approx(aupro(maps, masks), abs=1e-3)


# ---------------------------------------------------------------- masks missing / excluded


def test_has_mask_false_images_excluded_from_pixel_metrics():
    batches = _random_pixel_batches(5, n_batches=2)
    ref = AnomalyEvaluator()
    _feed(ref, batches)
    ev = AnomalyEvaluator()
    _feed(ev, batches)
    # an anomalous image without ground truth, with a map that would wreck pixel metrics
    odd_map = torch.full((1, 1, 24, 24), 100.0)
    ev.update(torch.tensor([5.0]), torch.tensor([1]), odd_map, torch.zeros(1, 1, 24, 24),
              torch.tensor([False]))
    got, want = ev.compute(), ref.compute()
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"):
        assert got[key] == want[key]
    assert len(ev.image_scores) == len(ref.image_scores) + 1 and ev.image_labels[-1] == 1


def test_anomalous_images_with_an_empty_mask_are_counted():
    """An anomalous image whose mask has no anomalous pixel (an empty file, or a defect lost in the
    resize) is counted (the run says so); one without ground truth (has_mask false) is not."""
    ev = AnomalyEvaluator()
    _feed(ev, _random_pixel_batches(5, n_batches=2))
    assert ev.empty_masks == 0
    masks = torch.zeros(4, 1, 24, 24)
    masks[1, 0, 3:6, 3:6] = 1
    ev.update(torch.rand(4), torch.tensor([1, 1, 0, 1]), torch.rand(4, 1, 24, 24), masks,
              torch.tensor([True, True, True, False]))
    assert ev.empty_masks == 1  # image 0; image 2 is normal, image 3 has no ground truth
    # every defective image's mask empty: no anomalous region at all, and the run still says so
    from types import SimpleNamespace

    from adtrain.engine import empty_anomaly_masks

    only_empty = AnomalyEvaluator()
    only_empty.update(torch.rand(3), torch.tensor([0, 1, 1]), torch.rand(3, 1, 24, 24), torch.zeros(3, 1, 24, 24),
                      torch.tensor([True, True, True]))
    assert only_empty.pixel.num_regions == 0
    assert empty_anomaly_masks(SimpleNamespace(evaluator=only_empty)) == 2
    assert empty_anomaly_masks(SimpleNamespace(evaluator=AnomalyEvaluator(pixel_metrics=False))) is None


def test_no_masks_gives_none_pixel_metrics():
    ev = AnomalyEvaluator()
    amap = torch.rand(4, 1, 8, 8)
    ev.update(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1]), amap)
    ev.update(torch.tensor([0.3]), torch.tensor([1]), amap[:1], torch.zeros(1, 1, 8, 8),
              torch.tensor([False]))
    m = ev.compute()
    assert m["image_auroc"] == pytest.approx(1.0)
    assert all(m[k] is None for k in ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"))
    assert set(m) == {"image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap",
                      "pixel_f1max", "pixel_aupro"}
    ev.reset()
    assert ev.image_scores == [] and ev.compute()["image_auroc"] is None


def test_only_anomalous_images_gives_none_image_auroc():
    maps, masks = _hand_aupro_case(False)
    ev = AnomalyEvaluator()
    ev.update(torch.tensor([0.9]), torch.tensor([1]), maps[:1], masks[:1])
    m = ev.compute()
    assert m["image_auroc"] is None and m["pixel_auroc"] is not None


def test_low_precision_inputs_and_bad_inputs():
    maps, masks = _hand_aupro_case(False)
    ev = AnomalyEvaluator()
    ev.update(torch.tensor([0.9, 0.8], dtype=torch.bfloat16), torch.tensor([1, 0]),
              maps.to(torch.bfloat16), masks.half())
    assert ev.compute()["pixel_aupro"] == pytest.approx(HAND_STEP, abs=1e-3)
    with pytest.raises(AdtrainError, match="differ in size"):
        ev.update(torch.zeros(2), torch.tensor([1, 0]), maps, masks[..., :5])
    with pytest.raises(AdtrainError, match="NaN"):
        ev.update(torch.zeros(2), torch.tensor([1, 0]), maps * float("nan"), masks)
    with pytest.raises(ConfigError):
        AnomalyEvaluator(aupro_fpr_limit=0.0)


def test_float64_image_scores_keep_their_precision():
    """Scores 1e8 + 0..3 differ only past float32's precision: the evaluator and image_metrics
    both rank them as float64 (the evaluator used to round them to float32, giving 0.5)."""
    from adtrain.metrics.image import image_metrics

    s, y = torch.tensor([1e8, 1e8 + 1, 1e8 + 2, 1e8 + 3], dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    ev = AnomalyEvaluator(pixel_metrics=False)
    ev.update(s, y)
    assert ev.compute()["image_auroc"] == image_metrics(s, y)["image_auroc"] == 0.75


@pytest.mark.parametrize("dtype,base,step", [(torch.float64, 1.0, 1e-9), (torch.int64, 2 ** 24, 1)])
def test_float64_and_integer_maps_keep_their_precision_in_pixel_metrics(dtype, base, step):
    """The defect pixel scores above the others only past float32's precision: the evaluator
    counts the map as the pixel accumulator does (fp64), not cut to fp32 (ties: AUROC 0.5)."""
    from adtrain.metrics.pixel import PixelMetricAccumulator

    amap = torch.full((2, 1, 4, 4), base, dtype=dtype)
    amap[1, 0, 1, 2] = base + step
    mask = torch.zeros(2, 1, 4, 4)
    mask[1, 0, 1, 2] = 1
    ev = AnomalyEvaluator(pixel_threshold=float(base))
    ev.update(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), amap, mask)
    got = ev.compute()
    acc = PixelMetricAccumulator()
    acc.update(amap[:, 0], mask[:, 0] > 0.5)
    assert {k: got[k] for k in ("pixel_auroc", "pixel_ap", "pixel_f1max")} == \
        {k: acc.compute()[k] for k in ("pixel_auroc", "pixel_ap", "pixel_f1max")} == \
        {"pixel_auroc": 1.0, "pixel_ap": 1.0, "pixel_f1max": 1.0}
    assert ev.compute_pixels_at_threshold()["tp"] == 1 and ev.compute_pixels_at_threshold()["fp"] == 0


def test_exactness_counts_scores_still_held_after_streaming_began():
    """Past the exact budget, scores added since the last flush can merge bins: ``exact`` says so
    before a compute, as it does after one."""
    from adtrain.metrics.pixel import PixelMetricAccumulator

    acc = PixelMetricAccumulator(num_bins=4, exact_pixels=3)
    acc.update(torch.tensor([[[0.1, 0.2], [0.3, 0.4]]]), torch.tensor([[[False, False], [False, True]]]))
    assert acc.exact  # four scores in four bins
    acc.update(torch.tensor([[[0.5, 0.6]]]), torch.tensor([[[True, False]]]))
    before = acc.exact
    figures = acc.compute()
    assert before is False and acc.exact is False and acc.compute() == figures


# ---------------------------------------------------------------- bounded memory


def test_normal_pixel_state_has_fixed_size():
    num_bins = 4096
    ev = AnomalyEvaluator(num_bins=num_bins)
    g = torch.Generator().manual_seed(6)
    mask = torch.zeros(8, 1, 64, 64)
    mask[:2, 0, 10:20, 10:30] = 1
    label = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0])
    sizes = []
    for i in range(200):
        amap = torch.rand(8, 1, 64, 64, generator=g) * (1 + i / 50) + mask
        ev.update(amap.amax((1, 2, 3)), label, amap, mask)
        if i in (0, 199):
            sizes.append(ev.pixel.nbytes)
    bins = ev.pixel.bins
    assert len(bins) <= num_bins and all(c.shape == (len(bins),) for c in bins.counts.values())
    assert max(sizes) <= bins.max_nbytes == 5 * 8 * num_bins  # 6.5M pixels seen, 160 KiB kept
    assert bins.counts["normal"].sum() + bins.counts["anomalous"].sum() == 200 * 8 * 64 * 64
    assert bins.counts["anomalous"].sum() == 200 * 2 * 10 * 20
    assert ev.pixel.num_regions == 400 and len(ev.image_scores) == 1600


# ---------------------------------------------------------------- heavy-tailed maps


def _heavy_tailed_batches(seed: int, n_batches: int = 4, b: int = 3, size: int = 20, spike: float = 1e6):
    """Smooth maps with defects slightly above normal, plus one pixel `spike` x the maximum:
    linear bins over the observed range put every other score into the first bin."""
    maps, masks = _random_defect_maps(seed, n=n_batches * b, size=size)
    maps = maps.double()
    maps[1, 0, 3, 3] = spike * float(maps.max())  # a normal pixel of a defective image
    return [(maps[i : i + b], masks[i : i + b]) for i in range(0, n_batches * b, b)]


def _exact_pixel_metrics(batches, limit: float = 0.3):
    s = torch.cat([a for a, _ in batches]).numpy().ravel()
    y = (torch.cat([k for _, k in batches]).numpy().ravel() > 0.5).astype(int)
    maps = torch.cat([a for a, _ in batches])[:, 0].numpy()
    masks = torch.cat([k for _, k in batches])[:, 0].numpy() > 0.5
    return roc_auc_score(y, s), average_precision_score(y, s), _brute_force_aupro(maps, masks, limit)


@pytest.mark.parametrize("num_bins", [65536, 256])
def test_heavy_tailed_maps_match_exact_metrics(num_bins):
    batches = _heavy_tailed_batches(7)
    ev = AnomalyEvaluator(num_bins=num_bins)
    for amap, mask in batches:
        ev.update(amap.amax((1, 2, 3)), (mask.flatten(1).amax(1) > 0).long(), amap, mask)
    m, bounds = ev.compute(), ev.pixel.error_bounds()
    exact_auroc, exact_ap, exact_aupro = _exact_pixel_metrics(batches)
    assert exact_auroc > 0.9 and exact_aupro > 0.8  # linear bins over the range gave 0.50 / 0.15 here
    if num_bins == 65536:  # 4800 pixels: every distinct score kept
        assert ev.pixel.bins.exact and bounds == {"pixel_auroc": 0.0, "pixel_ap": 0.0, "pixel_f1max": 0.0, "pixel_aupro": 0.0}
        assert m["pixel_auroc"] == pytest.approx(exact_auroc, abs=1e-12)
        assert m["pixel_ap"] == pytest.approx(exact_ap, abs=1e-12)
        assert m["pixel_aupro"] == pytest.approx(exact_aupro, abs=1e-12)
    else:  # 256 bins for 4800 distinct scores: merged by mass, within the reported bound
        assert len(ev.pixel.bins) <= 256 and not ev.pixel.bins.exact
        assert abs(m["pixel_auroc"] - exact_auroc) <= bounds["pixel_auroc"] <= 0.01
        assert abs(m["pixel_aupro"] - exact_aupro) <= bounds["pixel_aupro"] <= 0.05


def test_held_pixel_scores_are_exact_past_the_bins_capacity_until_their_budget():
    """exact_pixels (validation's): scores held up to the budget are counted exactly in one sort,
    even with far more distinct scores than bins; past it the bins take over, within their bound."""
    batches = _heavy_tailed_batches(7)  # 4800 distinct scores
    exact_auroc, exact_ap, exact_aupro = _exact_pixel_metrics(batches)
    held, over = AnomalyEvaluator(num_bins=256, exact_pixels=4800), AnomalyEvaluator(num_bins=256, exact_pixels=2000)
    for ev in (held, over):
        for amap, mask in batches:
            ev.update(amap.amax((1, 2, 3)), (mask.flatten(1).amax(1) > 0).long(), amap, mask)
    m = held.compute()
    assert len(held.pixel.bins) == 0 and held.pixel.exact and held.pixel.nbytes >= 4800 * 4
    assert held.pixel.error_bounds() == {"pixel_auroc": 0.0, "pixel_ap": 0.0, "pixel_f1max": 0.0, "pixel_aupro": 0.0}
    assert m["pixel_auroc"] == pytest.approx(exact_auroc, abs=1e-12)
    assert m["pixel_ap"] == pytest.approx(exact_ap, abs=1e-12)
    assert m["pixel_aupro"] == pytest.approx(exact_aupro, abs=1e-12)
    assert held.compute() == m  # computing again counts the same scores again
    m, bounds = over.compute(), over.pixel.error_bounds()
    assert 0 < len(over.pixel.bins) <= 256 and not over.pixel.exact
    assert abs(m["pixel_auroc"] - exact_auroc) <= bounds["pixel_auroc"] <= 0.01
    assert abs(m["pixel_aupro"] - exact_aupro) <= bounds["pixel_aupro"] <= 0.05
    with pytest.raises(ConfigError, match="exact_pixels"):
        AnomalyEvaluator(exact_pixels=-1)
        assert m["pixel_ap"] == pytest.approx(exact_ap, abs=0.02)


@pytest.mark.parametrize("case", ["ties", "anomalies_at_the_ends", "one_value", "coarse_grid"])
def test_held_counts_merge_normal_runs_without_changing_any_metric(case):
    """exact_counts (held CPU scores) keeps one group per distinct anomalous score and one per run
    of normal scores between two: every metric equals the one from every distinct score
    (distinct_counts) and, for AUROC / AP / F1-max, scikit-learn's; far fewer groups."""
    from adtrain.metrics.curves import auroc_from_counts, f1max_from_counts, pro_auc_from_counts
    from adtrain.metrics.pixel import distinct_counts, exact_counts

    g = torch.Generator().manual_seed(5)
    maps = torch.rand(6, 40, 40, generator=g)
    masks = torch.zeros(6, 40, 40, dtype=torch.bool)
    masks[:3, 5:15, 8:20] = True
    masks[1, 30:34, 30:38] = True
    if case == "ties":  # normal and anomalous pixels tied on a grid of values
        maps = (maps * 50).round() / 50
    elif case == "anomalies_at_the_ends":  # the highest and the lowest scores are anomalous
        maps[masks] = maps[masks] * 0.1 + 0.95
        maps[0, 5, 8], maps[0, 6, 8] = 2.0, -1.0
    elif case == "one_value":
        maps = torch.full_like(maps, 0.5)
    else:
        maps = (maps * 4).floor()
    maps = maps + masks * 0.3 * (case != "one_value")
    weights, regions = region_weights(masks[:3].numpy())
    values, anomalous = maps.reshape(-1), maps[:3][masks[:3]]
    _, normal, anom, pro = distinct_counts(values, anomalous, weights)
    want = {"normal": normal.numpy(), "anomalous": anom.numpy(), "pro": pro.numpy()}
    got = exact_counts(values.clone(), anomalous, weights)
    assert got["anomalous"].sum() == anom.sum() and got["normal"].sum() == normal.sum()
    assert len(got["normal"]) <= 2 * np.unique(anomalous.numpy()).size + 1 <= 2 * len(want["normal"]) + 1
    for name, f in [("auroc", auroc_from_counts), ("ap", ap_from_counts), ("f1", f1max_from_counts)]:
        a, b = f(got["anomalous"], got["normal"]), f(want["anomalous"], want["normal"])
        assert (a is None and b is None) or a == pytest.approx(b, abs=1e-12), name
    for limit in (0.3, 0.05, 1.0):
        assert pro_auc_from_counts(got["normal"], got["pro"], regions, limit) == pytest.approx(
            pro_auc_from_counts(want["normal"], want["pro"], regions, limit), abs=1e-12)
    y, sc = masks.numpy().ravel().astype(int), maps.numpy().ravel()
    if case != "one_value":
        assert auroc_from_counts(got["anomalous"], got["normal"]) == pytest.approx(roc_auc_score(y, sc), abs=1e-12)
        assert ap_from_counts(got["anomalous"], got["normal"]) == pytest.approx(average_precision_score(y, sc), abs=1e-12)
        p, r, _ = precision_recall_curve(y, sc)
        f1 = np.max(2 * p * r / np.maximum(p + r, 1e-300))
        assert f1max_from_counts(got["anomalous"], got["normal"]) == pytest.approx(f1, abs=1e-12)
    if case == "ties":
        assert len(got["normal"]) < len(want["normal"]) + 2
    # the torch branch (GPUs) finds the same bounds as numpy's
    from adtrain.metrics.pixel import _anomalous_bounds, _anomalous_bounds_torch

    by_numpy, by_torch = _anomalous_bounds(values.clone(), anomalous), _anomalous_bounds_torch(values, anomalous)
    assert by_numpy[:2] == by_torch[:2] and all(np.array_equal(a, b) for a, b in zip(by_numpy[2:], by_torch[2:]))


def test_half_precision_maps_are_held_in_fp32_with_the_same_figures():
    """Scores are held in fp32 whatever the map's dtype (fp16/bf16 widened exactly, fp32 not
    copied to fp64): the same figures as the fp64 maps of the same values, half their bytes."""
    from adtrain.metrics.pixel import PixelMetricAccumulator, score_dtype

    g = torch.Generator().manual_seed(7)
    maps = ((torch.rand(6, 32, 32, generator=g) * 50).round() / 50).half()  # ties, exact in fp16
    masks = torch.zeros(6, 32, 32, dtype=torch.bool)
    masks[:3, 4:12, 6:20] = True
    maps = (maps.float() + 0.25 * masks).half()
    runs = {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        acc = PixelMetricAccumulator(exact_pixels=1 << 16)
        x = maps.to(dtype) if dtype != torch.bfloat16 else maps.float().to(dtype)
        for i in range(0, 6, 2):
            acc.update(x[i:i + 2], masks[i:i + 2])
        held = {v.dtype for v, _, _ in acc._held}
        assert held == {torch.float64 if dtype == torch.float64 else torch.float32}, dtype
        runs[dtype] = (acc.compute(), acc.nbytes, acc.exact)
    assert runs[torch.float16][0] == runs[torch.float32][0] == runs[torch.float64][0]
    assert runs[torch.float16][1] == runs[torch.float32][1] < runs[torch.float64][1]
    assert all(exact for _, _, exact in runs.values())
    bf = maps.float().to(torch.bfloat16)  # other values (bf16 rounds them): against fp64 of the same
    want = PixelMetricAccumulator(exact_pixels=1 << 16)
    want.update(bf.double(), masks)
    assert runs[torch.bfloat16][0] == want.compute()
    assert score_dtype(torch.float64, torch.device("mps")) == torch.float32  # MPS has no fp64
    assert score_dtype(torch.int32, torch.device("cpu")) == torch.float64  # integers exactly


def test_heavy_tail_arriving_late_keeps_the_resolution():
    """The spike comes in the last batch, after bins were merged: the bulk keeps its bins."""
    batches = _heavy_tailed_batches(8, n_batches=6)
    spike = batches[0][0][1, 0, 3, 3].item()
    batches[0][0][1, 0, 3, 3] = 0.5
    batches[-1][0][0, 0, 0, 0] = spike
    ev = AnomalyEvaluator(num_bins=256)
    for amap, mask in batches:
        ev.update(amap.amax((1, 2, 3)), (mask.flatten(1).amax(1) > 0).long(), amap, mask)
    exact_auroc, _, exact_aupro = _exact_pixel_metrics(batches)
    m = ev.compute()
    assert m["pixel_auroc"] == pytest.approx(exact_auroc, abs=0.005)
    assert m["pixel_aupro"] == pytest.approx(exact_aupro, abs=0.02)


def test_sorted_segment_sums_match_index_add():
    """The GPU's deterministic grouping of the PRO weights (one cumulative sum) gives the sums
    index_add_ gives, per distinct index, for a nondecreasing index."""
    from adtrain.metrics.summary import sorted_segment_sums

    g = torch.Generator().manual_seed(4)
    index = torch.sort(torch.randint(0, 50, (1000,), generator=g)).values
    values = torch.rand(1000, generator=g, dtype=torch.float64)
    at, sums = sorted_segment_sums(index, values)
    want = torch.zeros(50, dtype=torch.float64).index_add_(0, index, values)
    assert torch.equal(at, torch.unique(index))
    assert torch.allclose(sums, want[at], rtol=0, atol=1e-12)


def test_per_category_per_defect_and_threshold_figures_from_score_rows():
    from adtrain.metrics.image import at_threshold, auroc_by_defect, by_category
    from adtrain.report import run_table

    def row(cat, defect, label, score, pred):
        return {"category": cat, "defect": defect, "label": label, "score": score, "prediction": pred}

    rows = [row("a", "good", 0, 1.0, 0), row("a", "good", 0, 3.0, 1), row("a", "crack", 1, 2.0, 1),
            row("a", "hole", 1, 4.0, 1), row("b", "good", 0, 0.5, 0), row("b", "crack", 1, 0.2, 0)]
    # each defect against its own category's normals only (b's normal 0.5 is not a's)
    assert auroc_by_defect(rows) == {"a/crack": 0.5, "a/hole": 1.0, "b/crack": 0.0}
    assert auroc_by_defect(rows[:4]) == {"crack": 0.5, "hole": 1.0}
    cats = by_category(rows, {"a": {"pixel_auroc": 0.9}, "b": {"pixel_auroc": 0.7}})
    assert {c: v["image_auroc"] for c, v in cats.items()} == {"a": 0.75, "b": 0.0, "mean": 0.375}
    assert cats["mean"]["pixel_auroc"] == pytest.approx(0.8) and by_category(rows[:4]) is None
    assert by_category(rows, {"a": {"pixel_auroc": 0.9}, "b": {"pixel_auroc": None}})["mean"]["pixel_auroc"] is None
    at = at_threshold(rows)
    assert (at["tp"], at["fp"], at["tn"], at["fn"]) == (2, 1, 2, 1)
    assert at["recall"] == 2 / 3 and at["false_alarm_rate"] == 1 / 3 and at["precision"] == 2 / 3
    assert at["f1"] == 4 / 6 and at["accuracy"] == 4 / 6
    assert at_threshold([{**r, "prediction": None} for r in rows]) is None
    normals = at_threshold([r for r in rows if r["label"] == 0])  # no defect to find: recall and F1 undefined
    assert (normals["fp"], normals["precision"], normals["recall"], normals["f1"]) == (1, 0.0, None, None)
    table = run_table({"image_auroc": 0.6, "image_ap": 0.5, "pixel_auroc": 0.7, "by_category": cats,
                       "image_auroc_by_defect": auroc_by_defect(rows), "test_at_threshold": at,
                       "val_image_auroc": 0.9}, "RUN")[2]
    # several categories: the top-level figures rank all images (pixels) together (pooled: each says so, AP and
    # the pixel figures too, which had no word), the protocol's mean first
    assert [r[0] for r in table] == ["image AUROC, categories pooled", "  image AUROC, mean of categories",
                                     "  image AUROC, a", "  image AUROC, b", "image AP, categories pooled",
                                     "pixel AUROC, categories pooled",
                                     "defects caught at threshold", "false alarms at threshold", "image AUROC"]
    assert [r[1] for r in table[:4]] == ["0.6000", "0.3750", "0.7500", "0.0000"]
