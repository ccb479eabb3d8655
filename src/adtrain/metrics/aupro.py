"""AUPRO: area under the per-region-overlap curve up to a false-positive-rate limit.

Regions are the 8-connected components of each image's ground-truth mask. PRO(t) is the mean
over all regions of the dataset of the fraction of the region's pixels with score above t;
FPR(t) is the fraction of all normal pixels above t. The curve is integrated over FPR in
[0, limit] (trapezoid rule, interpolated at the limit) and divided by the limit.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from adtrain.errors import AdtrainError, ConfigError
from adtrain.metrics._arrays import check_finite, to_numpy
from adtrain.metrics.curves import pro_auc_from_counts

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def check_fpr_limit(fpr_limit: float) -> float:
    if not 0.0 < fpr_limit <= 1.0:
        raise ConfigError("aupro_fpr_limit", f"must be in (0, 1], got {fpr_limit}")
    return float(fpr_limit)


def region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """For boolean masks (N,H,W): 1/region size for each True pixel (row-major), region count."""
    weights, num_regions = [], 0
    for mask in masks:
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            continue
        cols = np.flatnonzero(mask.any(axis=0))
        # labelled inside the defect's bounding box: the same regions, the True pixels in the same
        # (row-major) order, a fraction of the pixels to scan
        mask = mask[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
        labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        sizes = np.bincount(labels.reshape(-1))
        weights.append(1.0 / sizes[labels[mask]])
        num_regions += int(n)
    if not weights:
        return np.zeros(0, dtype=np.float64), 0
    return np.concatenate(weights), num_regions


def _as_maps(x, name: str, dtype) -> np.ndarray:
    a = to_numpy(x, dtype=np.float64)
    if a.ndim == 4:
        if a.shape[1] != 1:
            raise AdtrainError(f"{name} must be (N,1,H,W) or (N,H,W), got {a.shape}")
        a = a[:, 0]
    elif a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise AdtrainError(f"{name} must be (N,1,H,W) or (N,H,W), got {a.shape}")
    return a > 0.5 if dtype is bool else a


def aupro(anomaly_maps, masks, fpr_limit: float = 0.3) -> float | None:
    """Exact AUPRO over all given images (non-streaming; for tests and small sets).

    anomaly_maps and masks: (N,1,H,W), (N,H,W) or (H,W), tensors or arrays; mask > 0.5 is
    anomalous. Returns None when there is no anomalous region or no normal pixel.
    """
    fpr_limit = check_fpr_limit(fpr_limit)
    maps = _as_maps(anomaly_maps, "anomaly_maps", np.float64)
    gt = _as_maps(masks, "masks", bool)
    if maps.shape != gt.shape:
        raise AdtrainError(f"anomaly_maps {maps.shape} and masks {gt.shape} differ in shape")
    check_finite(maps, "anomaly_maps")
    weights, num_regions = region_weights(gt)
    neg_scores, pos_scores = maps[~gt], maps[gt]
    _, inverse = np.unique(np.concatenate([neg_scores, pos_scores]), return_inverse=True)
    inverse = inverse.reshape(-1)
    n_groups = int(inverse.max()) + 1 if inverse.size else 0
    neg = np.bincount(inverse[: neg_scores.size], minlength=n_groups)
    pro_weight = np.bincount(inverse[neg_scores.size :], weights=weights, minlength=n_groups)
    return pro_auc_from_counts(neg, pro_weight, num_regions, fpr_limit)
