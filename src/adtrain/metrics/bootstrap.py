"""How sure a validation set is that one detector ranks better than another: a paired, stratified
bootstrap of the image AUROC.

Both detectors score the same validation items. Each resample draws the normals and the anomalies
with replacement (separately, so every resample keeps both classes) and compares the two AUROCs
on it; the result is the share of resamples in which ``new`` beats ``old`` (ties count half).
A held-out set of ~100 items gives AUROCs whose differences of a few thousandths are noise: a
selection that must not lose to an untrained start asks for a share of, e.g., 0.9 before it
replaces the start (``selection.start_confidence``).
"""

from __future__ import annotations

import numpy as np


def _pair_wins(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """G[i, j] = 1 if anomaly j outscores normal i, 0.5 on a tie, else 0."""
    normal, anomalous = scores[labels == 0], scores[labels == 1]
    diff = anomalous[None, :] - normal[:, None]
    return (diff > 0).astype(np.float64) + 0.5 * (diff == 0)


def paired_auroc_confidence(new_scores, old_scores, labels, n_boot: int = 2000, seed: int = 0) -> float:
    """Share of stratified bootstrap resamples in which ``new_scores`` has the higher image AUROC."""
    new, old = np.asarray(new_scores, dtype=np.float64), np.asarray(old_scores, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    if not (new.shape == old.shape == labels.shape) or new.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D and of one length, got {new.shape}, {old.shape}, "
                         f"{labels.shape}")
    n_norm, n_anom = int((labels == 0).sum()), int((labels == 1).sum())
    if n_norm == 0 or n_anom == 0:
        raise ValueError("paired_auroc_confidence needs normal and anomalous items")
    diff = _pair_wins(new, labels) - _pair_wins(old, labels)  # (normals, anomalies)
    rng = np.random.default_rng(seed)
    w_n = rng.multinomial(n_norm, np.full(n_norm, 1.0 / n_norm), size=n_boot).astype(np.float64)
    w_a = rng.multinomial(n_anom, np.full(n_anom, 1.0 / n_anom), size=n_boot).astype(np.float64)
    delta = np.einsum("bi,ij,bj->b", w_n, diff, w_a) / (n_norm * n_anom)
    return float((delta > 0).mean() + 0.5 * (delta == 0).mean())
