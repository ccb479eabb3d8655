"""Exact image-level metrics (every score kept, ties grouped)."""

from __future__ import annotations

import numpy as np

from adtrain.errors import AdtrainError
from adtrain.metrics._arrays import check_finite, to_numpy
from adtrain.metrics.curves import ap_from_counts, auroc_from_counts, f1max_from_counts


def grouped_counts(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative counts per distinct score, ascending (exact, float64)."""
    s = to_numpy(scores).reshape(-1)
    y = to_numpy(labels).reshape(-1)
    if s.shape != y.shape:
        raise AdtrainError(f"scores ({s.size}) and labels ({y.size}) differ in length")
    check_finite(s, "scores")
    if not np.all((y == 0) | (y == 1)):
        raise AdtrainError("labels must be 0 (normal) or 1 (anomalous)")
    _, inverse = np.unique(s, return_inverse=True)
    inverse = inverse.reshape(-1)
    n_groups = int(inverse.max()) + 1 if inverse.size else 0
    pos = np.bincount(inverse, weights=y, minlength=n_groups)
    neg = np.bincount(inverse, weights=1.0 - y, minlength=n_groups)
    return pos, neg


def auroc(scores, labels) -> float | None:
    """Exact AUROC (ties count half); None when only one class is present."""
    return auroc_from_counts(*grouped_counts(scores, labels))


def average_precision(scores, labels) -> float | None:
    """Exact average precision (sklearn definition); None without anomalous samples."""
    return ap_from_counts(*grouped_counts(scores, labels))


def f1_max(scores, labels) -> float | None:
    """Largest F1 over all thresholds; None without anomalous samples."""
    return f1max_from_counts(*grouped_counts(scores, labels))


def image_metrics(scores, labels) -> dict[str, float | None]:
    """image_auroc, image_ap, image_f1max from image scores and 0/1 labels."""
    pos, neg = grouped_counts(scores, labels)
    return {
        "image_auroc": auroc_from_counts(pos, neg),
        "image_ap": ap_from_counts(pos, neg),
        "image_f1max": f1max_from_counts(pos, neg),
    }
