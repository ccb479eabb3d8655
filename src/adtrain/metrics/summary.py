"""Adaptive bins for streaming pixel metrics: exact while few distinct values, rank-bounded after.

The state is a sorted list of at most `capacity` bins, each covering a score range [lo, hi]
(lo == hi: one exact score) with per-channel sums (normal count, anomalous count, PRO weight).
Each batch's distinct scores are added exactly; only when the list grows past `capacity` are
adjacent bins merged, by equal shares of (normalised) mass, never by score range. So a heavy
tail or a spike cannot squash the bulk of the scores into one bin (as linear bins do), at most
capacity/2 + 1 bins survive a merge, and each merged group holds, besides its last bin, less than
6/capacity of any channel's mass at the time. Scores that later fall inside a merged bin's range
join it. Metrics from these bins are exact up to the order inside multi-score bins, and
`error_bounds` says how far off they can be. Memory: at most 5 x 8 x capacity bytes.
"""

from __future__ import annotations

import numpy as np

CHANNELS = ("normal", "anomalous", "pro")


class AdaptiveBins:
    """Sorted score bins with channels normal (int), anomalous (int), pro (float)."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.reset()

    def reset(self) -> None:
        self.lo = np.zeros(0, dtype=np.float64)
        self.hi = np.zeros(0, dtype=np.float64)
        self.counts = {"normal": np.zeros(0, np.int64), "anomalous": np.zeros(0, np.int64),
                       "pro": np.zeros(0, np.float64)}
        self.merges = 0

    def __len__(self) -> int:
        return int(self.lo.size)

    @property
    def nbytes(self) -> int:
        return int(self.lo.nbytes + self.hi.nbytes + sum(c.nbytes for c in self.counts.values()))

    @property
    def max_nbytes(self) -> int:
        """The most nbytes can ever be (between updates): capacity bins of five 8-byte fields."""
        return 5 * 8 * self.capacity

    @property
    def exact(self) -> bool:
        """True while every bin holds one distinct score (metrics equal the exact ones)."""
        return bool(np.all(self.lo == self.hi))

    def add(self, values: np.ndarray, normal: np.ndarray, anomalous: np.ndarray, pro: np.ndarray) -> None:
        """Add distinct, ascending float64 `values` with their per-channel sums."""
        if values.size == 0:
            return
        new = {"normal": normal.astype(np.int64), "anomalous": anomalous.astype(np.int64),
               "pro": pro.astype(np.float64)}
        # a value inside an existing bin's [lo, hi] (an equal score included) joins that bin
        k = np.searchsorted(self.lo, values, side="right") - 1
        inside = k >= 0
        inside[inside] = values[inside] <= self.hi[k[inside]]
        if inside.any():
            for name, c in self.counts.items():
                c += np.bincount(k[inside], weights=new[name][inside], minlength=c.size).astype(c.dtype)
        rest = ~inside
        if rest.any():
            order = np.argsort(np.concatenate([self.lo, values[rest]]), kind="stable")
            self.lo = np.concatenate([self.lo, values[rest]])[order]
            self.hi = np.concatenate([self.hi, values[rest]])[order]
            for name in CHANNELS:
                self.counts[name] = np.concatenate([self.counts[name], new[name][rest]])[order]
        if len(self) > self.capacity:
            self._merge()

    def _merge(self) -> None:
        """Group adjacent bins by equal shares of combined normalised mass: <= capacity/2 + 1 bins."""
        mass = np.zeros(len(self))
        for c in self.counts.values():
            total = float(c.sum())
            if total > 0:
                mass += c / total
        share = float(mass.sum()) / (self.capacity // 2)
        before = np.concatenate(([0.0], np.cumsum(mass)[:-1]))
        group = np.floor(before / share).astype(np.int64)
        starts = np.flatnonzero(np.diff(group, prepend=-1))
        ends = np.r_[starts[1:], len(self)] - 1
        self.lo, self.hi = self.lo[starts], self.hi[ends]
        for name, c in self.counts.items():
            self.counts[name] = np.add.reduceat(c, starts)
        self.merges += 1

    def error_bounds(self, num_regions: int, fpr_limit: float) -> dict[str, float]:
        """Largest possible |binned - exact| for AUROC and AUPRO, from the order left unknown
        inside multi-score bins (0.0 while every bin is one score)."""
        multi = self.lo < self.hi
        neg, pos, pro = (self.counts[c].astype(np.float64) for c in CHANNELS)
        n, p = neg.sum(), pos.sum()
        auroc = 0.5 * float(np.sum(neg[multi] * pos[multi]) / (n * p)) if n > 0 and p > 0 else 0.0
        aupro = 0.0
        if n > 0 and num_regions > 0:
            # a bin spans a box in (FPR, PRO); the straight segment is off by at most its area
            fpr_hi = np.cumsum(neg[::-1])[::-1] / n  # FPR at each bin's lower edge
            in_range = multi & (fpr_hi - neg / n < fpr_limit)
            aupro = float(np.sum((neg[in_range] / n) * (pro[in_range] / num_regions))) / fpr_limit
        return {"pixel_auroc": auroc, "pixel_aupro": aupro}
