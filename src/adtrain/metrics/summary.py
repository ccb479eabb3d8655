"""Adaptive bins for streaming pixel metrics: exact while few distinct values, rank-bounded after.

The state is a sorted list of at most `capacity` bins, each covering a score range [lo, hi]
(lo == hi: one exact score) with per-channel sums (normal count, anomalous count, PRO weight).
Each batch's distinct scores are added exactly; only when the list grows past `capacity` are
adjacent bins merged, by equal shares of (normalised) mass, never by score range. So a heavy
tail or a spike cannot squash the bulk of the scores into one bin (as linear bins do), at most
capacity/2 + 1 bins survive a merge, and each merged group holds, besides its last bin, less than
6/capacity of any channel's mass at the time. Scores that later fall inside a merged bin's range
join it. Metrics from these bins are exact up to the order inside multi-score bins, and
`error_bounds` says how far off they can be. Memory: at most 5 x 8 x capacity bytes, on the
device of the scores (a GPU test's binning never leaves the GPU). Every sum runs in one order on
every run (on a GPU the float channel is summed by cumulative sums, not atomic adds).
"""

from __future__ import annotations

import numpy as np
import torch

CHANNELS = ("normal", "anomalous", "pro")
_DTYPES = {"normal": torch.int64, "anomalous": torch.int64, "pro": torch.float64}


def _as_tensor(x, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.reshape(-1).to(device=device if device is not None else t.device, dtype=dtype)


def sorted_segment_sums(index: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct indices, their sums) of ``values`` grouped by a nondecreasing ``index``, from one
    cumulative sum: the same order of additions on every run (unlike CUDA's atomic adds)."""
    last = torch.ones_like(index, dtype=torch.bool)
    last[:-1] = index[1:] != index[:-1]
    ends = torch.nonzero(last).flatten()
    cum = torch.cumsum(values, 0)[ends]
    return index[ends], cum - torch.cat([cum.new_zeros(1), cum[:-1]])


def _segment_add(target: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """target[index] += values for a nondecreasing index. Integers, and anything on the CPU, by
    index_add_ (exact, or one order); floats on a GPU by ``sorted_segment_sums`` (deterministic)."""
    if index.numel() == 0:
        return target
    if target.device.type == "cpu" or not values.is_floating_point():
        return target.index_add_(0, index, values)
    at, sums = sorted_segment_sums(index, values)
    target[at] += sums
    return target


class AdaptiveBins:
    """Sorted score bins with channels normal (int), anomalous (int), pro (float).

    The state lives on the device of the first values added (a GPU test keeps it there: no host
    copy per batch); ``lo``, ``hi`` and ``counts`` are host (numpy) copies, for the metrics.
    """

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.reset()

    def reset(self) -> None:
        self._lo = torch.zeros(0, dtype=torch.float64)
        self._hi = torch.zeros(0, dtype=torch.float64)
        self._c = {name: torch.zeros(0, dtype=dt) for name, dt in _DTYPES.items()}
        self._host: dict | None = None
        self.merges = 0

    def __len__(self) -> int:
        return int(self._lo.numel())

    @property
    def device(self) -> torch.device:
        return self._lo.device

    def _host_state(self) -> dict:
        if self._host is None:
            self._host = {"lo": self._lo.cpu().numpy(), "hi": self._hi.cpu().numpy(),
                          "counts": {name: c.cpu().numpy() for name, c in self._c.items()}}
        return self._host

    @property
    def lo(self) -> np.ndarray:
        return self._host_state()["lo"]

    @property
    def hi(self) -> np.ndarray:
        return self._host_state()["hi"]

    @property
    def counts(self) -> dict[str, np.ndarray]:
        return self._host_state()["counts"]

    @property
    def nbytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in (self._lo, self._hi, *self._c.values())))

    @property
    def max_nbytes(self) -> int:
        """The most nbytes can ever be (between updates): capacity bins of five 8-byte fields."""
        return 5 * 8 * self.capacity

    @property
    def exact(self) -> bool:
        """True while every bin holds one distinct score (metrics equal the exact ones)."""
        return bool(torch.equal(self._lo, self._hi))

    def add(self, values, normal, anomalous, pro) -> None:
        """Add distinct, ascending float64 `values` with their per-channel sums (tensors on any
        device, or arrays; an empty state moves to the values' device, else they move to it)."""
        if len(values) == 0:
            return
        if len(self) == 0 and isinstance(values, torch.Tensor) and values.device != self.device:
            self._lo, self._hi = self._lo.to(values.device), self._hi.to(values.device)
            self._c = {name: c.to(values.device) for name, c in self._c.items()}
        dev = self.device
        self._host = None
        values = _as_tensor(values, torch.float64, dev)
        new = {name: _as_tensor(x, _DTYPES[name], dev) for name, x in
               (("normal", normal), ("anomalous", anomalous), ("pro", pro))}
        # a value inside an existing bin's [lo, hi] (an equal score included) joins that bin
        k = torch.searchsorted(self._lo, values, right=True) - 1
        inside = k >= 0
        if len(self):
            inside &= values <= self._hi[k.clamp(min=0)]
        if bool(inside.any()):
            ki = k[inside]
            for name, c in self._c.items():
                _segment_add(c, ki, new[name][inside])  # ki ascends with the values
        rest = ~inside
        if bool(rest.any()):
            # both lists are sorted and no new value equals an old bound: a merge, not a sort
            v = values[rest]
            m = len(self)
            pos_new = torch.searchsorted(self._lo, v) + torch.arange(v.numel(), device=dev)
            pos_old = torch.searchsorted(v, self._lo) + torch.arange(m, device=dev)

            def merged(old: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
                out = torch.empty(m + add.numel(), dtype=old.dtype, device=dev)
                out[pos_old] = old
                out[pos_new] = add
                return out

            self._lo, self._hi = merged(self._lo, v), merged(self._hi, v)
            self._c = {name: merged(c, new[name][rest]) for name, c in self._c.items()}
        if len(self) > self.capacity:
            self._merge()

    def _merge(self) -> None:
        """Group adjacent bins by equal shares of combined normalised mass: <= capacity/2 + 1 bins."""
        n, dev = len(self), self.device
        mass = torch.zeros(n, dtype=torch.float64, device=dev)
        for c in self._c.values():
            total = float(c.sum())
            if total > 0:
                mass += c.double() / total
        share = float(mass.sum()) / (self.capacity // 2)
        before = torch.cat([torch.zeros(1, dtype=torch.float64, device=dev), torch.cumsum(mass, 0)[:-1]])
        group = torch.floor(before / share).long()
        first = torch.diff(group, prepend=group.new_full((1,), -1)) != 0
        starts = torch.nonzero(first).flatten()
        ends = torch.cat([starts[1:], starts.new_full((1,), n)]) - 1
        segment = torch.cumsum(first.long(), 0) - 1
        self._lo, self._hi = self._lo[starts], self._hi[ends]
        self._c = {name: _segment_add(torch.zeros(starts.numel(), dtype=c.dtype, device=dev), segment, c)
                   for name, c in self._c.items()}
        self.merges += 1

    def error_bounds(self, num_regions: int, fpr_limit: float) -> dict[str, float]:
        """Largest possible |binned - exact| for AUROC, AP, F1-max and AUPRO, from the order left
        unknown inside multi-score bins (0.0 while every bin is one score)."""
        multi = self.lo < self.hi
        neg, pos, pro = (self.counts[c].astype(np.float64) for c in CHANNELS)
        n, p = neg.sum(), pos.sum()
        auroc = 0.5 * float(np.sum(neg[multi] * pos[multi]) / (n * p)) if n > 0 and p > 0 else 0.0
        ap, f1 = precision_bounds(pos, neg, multi)
        aupro = 0.0
        if n > 0 and num_regions > 0:
            # a bin spans a box in (FPR, PRO); the straight segment is off by at most its area
            fpr_hi = np.cumsum(neg[::-1])[::-1] / n  # FPR at each bin's lower edge
            in_range = multi & (fpr_hi - neg / n < fpr_limit)
            aupro = float(np.sum((neg[in_range] / n) * (pro[in_range] / num_regions))) / fpr_limit
        return {"pixel_auroc": auroc, "pixel_ap": ap, "pixel_f1max": f1, "pixel_aupro": aupro}


def precision_bounds(pos: np.ndarray, neg: np.ndarray, multi: np.ndarray) -> tuple[float, float]:
    """Largest possible |binned - exact| of AP and of F1-max (adtrain.metrics.curves), bins sorted
    by ascending score, ``multi`` the bins holding more than one score.

    Above bin k lie TP positives and FP negatives, exactly; inside it m positives and h negatives in
    an unknown order. A positive's precision at its own threshold is at most (TP+m)/(TP+m+FP) and,
    as the i-th positive of the bin, at least (TP+i)/(TP+i+FP+h); summed over i = 1..m that is
    m - (FP+h) (psi(b+m+1) - psi(b+1)) with b = TP+FP+h. F1 at a bin's edge is exact (the binned
    F1-max is a lower bound); inside bin k it is at most 2(TP+m)/(TP+m+FP+P)."""
    p = pos.sum()
    if p <= 0 or not multi.any():
        return 0.0, 0.0
    from scipy.special import digamma

    pos_d, neg_d, multi_d = pos[::-1], neg[::-1], multi[::-1]  # from the highest bin down
    tp_above, fp_above = np.cumsum(pos_d) - pos_d, np.cumsum(neg_d) - neg_d
    m, h, tp, fp = pos_d[multi_d], neg_d[multi_d], tp_above[multi_d], fp_above[multi_d]
    binned = m * (tp + m) / np.maximum(tp + m + fp + h, 1.0)  # each bin's share in ap_from_counts (x P)
    upper = m * (tp + m) / np.maximum(tp + m + fp, 1.0)
    b = tp + fp + h
    lower = np.where(m > 0, m - (fp + h) * (digamma(b + m + 1.0) - digamma(b + 1.0)), 0.0)
    ap = max(float(np.sum(upper - binned)), float(np.sum(binned - lower))) / p
    tp_all, fp_all = np.cumsum(pos_d), np.cumsum(neg_d)
    f1_binned = float(np.max(2.0 * tp_all / (tp_all + fp_all + p)))
    f1_inside = float(np.max(2.0 * (tp + m) / (tp + m + fp + p)))
    return ap, max(0.0, f1_inside - f1_binned)
