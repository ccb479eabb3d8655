"""Exact image-level metrics (every score kept, ties grouped)."""

from __future__ import annotations

import math

import numpy as np

from adtrain.errors import AdtrainError
from adtrain.metrics._arrays import check_finite, to_numpy
from adtrain.metrics.curves import ap_from_counts, auroc_from_counts, f1_from_counts, f1max_from_counts


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
    """Exact average precision (sklearn definition); None when only one class is present."""
    return ap_from_counts(*grouped_counts(scores, labels))


def f1_max(scores, labels) -> float | None:
    """Largest F1 over all thresholds; None when only one class is present."""
    return f1max_from_counts(*grouped_counts(scores, labels))


def f1_max_threshold(scores, labels) -> tuple[float, float] | None:
    """(threshold, F1) of the largest F1 over all cuts, as a float32 threshold that decides
    "anomalous if score > threshold" (what adtrain's decisions do): midway between the lowest score the
    best cut flags and the next lower score (just below that score where it is the lowest). Of equal
    F1s the cut flagging the fewest images wins. None without anomalous samples."""
    s32 = to_numpy(scores).reshape(-1).astype(np.float32)
    f1 = f1_from_counts(*grouped_counts(s32, labels))  # entry k: flagging the top k + 1 distinct scores
    if f1 is None:
        return None
    s = np.unique(s32)
    g = s.size - 1 - int(np.argmax(f1))  # ascending index of the lowest flagged score
    low = np.float32(s[g])
    cut = np.float32((np.float64(s[g - 1]) + np.float64(low)) / 2.0) if g > 0 else low
    if cut >= low:  # adjacent float32 values, or the lowest score: the largest float32 below it
        cut = np.nextafter(low, np.float32(-np.inf))
    return float(cut), float(np.max(f1))


def image_metrics(scores, labels) -> dict[str, float | None]:
    """image_auroc, image_ap, image_f1max from image scores and 0/1 labels."""
    pos, neg = grouped_counts(scores, labels)
    return {
        "image_auroc": auroc_from_counts(pos, neg),
        "image_ap": ap_from_counts(pos, neg),
        "image_f1max": f1max_from_counts(pos, neg),
    }


def auroc_by_defect(records: list[dict]) -> dict[str, float | None]:
    """Image AUROC of each defect type's test images against the normal test images of their
    category (MVTec LOCO AD's logical / structural split; MVTec AD's per-defect figures). records:
    scores.csv rows (category, defect, label, score). Keys: the defect, or 'category/defect' where
    the test set holds several categories."""
    several = len({r["category"] for r in records}) > 1
    normals: dict[str, list[float]] = {}
    groups: dict[tuple[str, str], list[float]] = {}
    for r in records:
        if int(r["label"]) == 0:
            normals.setdefault(r["category"], []).append(float(r["score"]))
        else:
            groups.setdefault((r["category"], r["defect"]), []).append(float(r["score"]))
    out = {}
    for (cat, defect), scores in sorted(groups.items()):
        neg = normals.get(cat, [])
        out[f"{cat}/{defect}" if several else defect] = auroc(scores + neg, [1] * len(scores) + [0] * len(neg))
    return out


def at_threshold(records: list[dict]) -> dict | None:
    """The test images' decisions at the run's threshold (chosen on held-out normals, never on the
    test set): counts, recall (defects caught), false-alarm rate, precision, F1 and accuracy.
    records: scores.csv rows (label, prediction); None where the run has no threshold."""
    if not records or any(r.get("prediction") is None for r in records):
        return None
    tp = sum(1 for r in records if r["prediction"] and int(r["label"]) == 1)
    fp = sum(1 for r in records if r["prediction"] and int(r["label"]) == 0)
    fn = sum(1 for r in records if not r["prediction"] and int(r["label"]) == 1)
    tn = len(records) - tp - fp - fn

    def ratio(a, b):
        return a / b if b else None

    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "recall": ratio(tp, tp + fn),
            "false_alarm_rate": ratio(fp, fp + tn), "precision": ratio(tp, tp + fp),
            # F1 with no defect to find is undefined (its recall is), not the 0 of a formula
            "f1": ratio(2 * tp, 2 * tp + fp + fn) if tp + fn else None, "accuracy": ratio(tp + tn, len(records))}


def by_category(records: list[dict], pixel: dict[str, dict] | None = None) -> dict | None:
    """Each category's figures where a test set holds several (the multi-class "unified" protocol
    reports these and their mean): image AUROC / AP / F1-max from the score rows, and the pixel
    metrics of ``pixel`` (category -> figures, ``pixel_metrics_exact`` and ``pixel_error_bounds``, from the evaluator's
    per-category accumulators, which share its exact-pixel budget);
    under "mean", each figure's mean over the categories (None where one is None). None for a
    single category."""
    cats = sorted({r["category"] for r in records})
    if len(cats) < 2:
        return None
    out = {c: {**image_metrics([float(r["score"]) for r in records if r["category"] == c],
                               [int(r["label"]) for r in records if r["category"] == c]),
               **(pixel or {}).get(c, {})} for c in cats}
    mean = {}
    for k in out[cats[0]]:
        values = [out[c].get(k) for c in cats]
        if any(v is None for v in values):
            mean[k] = None
        elif isinstance(values[0], bool):  # pixel_metrics_exact: every category's
            mean[k] = all(values)
        elif isinstance(values[0], dict):  # pixel_error_bounds: a mean of figures is off by the bounds' mean
            mean[k] = {m: sum(v[m] for v in values) / len(cats) for m in values[0]}
        else:
            mean[k] = sum(values) / len(cats)
    out["mean"] = mean
    return out


def sample_auroc(records: list[dict], group) -> float | None:
    """AUROC over physical samples photographed from several views: a sample's score is its
    views' highest, its label defective if any view is. group: path -> sample key (None: the
    image is its own sample). None where no two images share a sample."""
    samples: dict[str, list] = {}
    for r in records:
        key = group(r["path"])
        key = r["path"] if key is None else key
        score, label = samples.get(key, (-math.inf, 0))
        samples[key] = (max(score, float(r["score"])), max(label, int(r["label"])))
    if len(samples) == len(records):
        return None
    return auroc([v[0] for v in samples.values()], [v[1] for v in samples.values()])
