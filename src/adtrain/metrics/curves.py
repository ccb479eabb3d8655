"""Curve metrics from grouped counts.

Every metric here takes per-group counts sorted by ascending score: a group is one distinct
score (exact metrics) or one histogram bin (streaming metrics). Scores inside a group are tied,
so AUROC counts them as half (trapezoid) and thresholds fall only between groups.
"""

from __future__ import annotations

import numpy as np


def trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoid rule (works on numpy 1.x and 2.x)."""
    if y.size < 2:
        return 0.0
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


def _tail_sums(counts: np.ndarray) -> np.ndarray:
    """Cumulative sums from the highest group down: entry k = sum of the top k+1 groups."""
    return np.cumsum(np.asarray(counts, dtype=np.float64)[::-1])


def auroc_from_counts(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """Area under the ROC curve; None when a class is empty."""
    tp, fp = _tail_sums(pos), _tail_sums(neg)
    if tp.size == 0 or tp[-1] <= 0 or fp[-1] <= 0:
        return None
    tpr = np.concatenate(([0.0], tp / tp[-1]))
    fpr = np.concatenate(([0.0], fp / fp[-1]))
    return trapezoid(tpr, fpr)


def ap_from_counts(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """Average precision: sum of recall step * precision over thresholds; None when a class is empty
    (with no negative every detector scores 1.0, sklearn's answer: no figure, as AUROC)."""
    tp, fp = _tail_sums(pos), _tail_sums(neg)
    if tp.size == 0 or tp[-1] <= 0 or fp[-1] <= 0:
        return None
    predicted = tp + fp
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall_step = np.diff(np.concatenate(([0.0], tp))) / tp[-1]
    return float(np.sum(recall_step * precision))


def f1_from_counts(pos: np.ndarray, neg: np.ndarray) -> np.ndarray | None:
    """F1 of each cut, entry k flagging the top k + 1 groups (predict anomalous at score >= the
    group's); None if no positive."""
    tp, fp = _tail_sums(pos), _tail_sums(neg)
    if tp.size == 0 or tp[-1] <= 0:
        return None
    return 2.0 * tp / (tp + fp + tp[-1])  # 2TP / (2TP + FP + FN), FN = P - TP


def f1max_from_counts(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """Largest F1 over all thresholds (predict anomalous at score >= threshold); None when a class is
    empty (with no negative, flagging everything scores 1.0 for any detector)."""
    f1 = f1_from_counts(pos, neg)
    if f1 is None or _tail_sums(neg)[-1] <= 0:
        return None
    return float(np.max(f1))


def partial_trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for x in [x[0], x_max]; x nondecreasing, y interpolated."""
    k = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    area = trapezoid(y[:k], x[:k])
    if 0 < k < x.size:
        x0, y0, x1, y1 = x[k - 1], y[k - 1], x[k], y[k]
        y_lim = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += float((x_max - x0) * (y0 + y_lim) / 2.0)
    return area


def pro_auc_from_counts(
    neg: np.ndarray, pro_weight: np.ndarray, num_regions: int, fpr_limit: float
) -> float | None:
    """Normalised area under the PRO-vs-FPR curve up to fpr_limit.

    neg: normal-pixel counts per group; pro_weight: sum over anomalous pixels in the group of
    1 / (size of the pixel's region). PRO at a threshold is the tail sum of pro_weight divided
    by num_regions. None when there are no regions or no normal pixels.
    """
    fp = _tail_sums(neg)
    if num_regions <= 0 or fp.size == 0 or fp[-1] <= 0:
        return None
    fpr = np.concatenate(([0.0], fp / fp[-1]))
    pro = np.concatenate(([0.0], np.minimum(_tail_sums(pro_weight) / num_regions, 1.0)))
    return float(partial_trapezoid(fpr, pro, fpr_limit) / fpr_limit)
