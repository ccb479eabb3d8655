"""Streaming pixel-level metrics: AUROC, AP, F1-max and AUPRO from one set of adaptive bins.

State (adtrain.metrics.summary.AdaptiveBins): at most `num_bins` score bins with three channels,
`normal` (count of normal pixels), `anomalous` (count of ground-truth pixels) and `pro` (sum over
ground-truth pixels of 1 / size of their region). Memory does not grow with the test set. While
the test set has at most `num_bins` distinct scores the metrics are exact; past that, bins merge
by equal shares of pixel mass (not of score range, so heavy-tailed maps keep their resolution)
and `error_bounds()` bounds the difference to the exact values. Distinct scores and their counts
are found on the input's device and binned there; only the (few) anomalous pixels' indices
come to the CPU (for their regions), and the bins once, when the metrics are computed.

With ``exact_pixels`` > 0 the scores are first held, up to that many, and counted exactly in one
sort when the metrics are computed (``exact_counts``; validation: base.VAL_EXACT_PIXELS, the test:
``metrics.exact_pixels``); past it, streaming as above takes over, from the same counts.
"""

from __future__ import annotations

import numpy as np
import torch

from adtrain.errors import AdtrainError, ConfigError
from adtrain.metrics.aupro import check_fpr_limit, region_weights
from adtrain.metrics.curves import (
    ap_from_counts,
    auroc_from_counts,
    f1max_from_counts,
    pro_auc_from_counts,
)
from adtrain.metrics.summary import AdaptiveBins

PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")


def score_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype pixel scores are held and counted in: fp32 and fp64 as they come, anything else
    (fp16, bf16 maps under autocast) widened to fp32, which is exact and keeps the order and the
    ties (the same distinct values, the same counts), at half the bytes of fp64 to hold and sort;
    fp64 only where the device has it (not MPS), for fp64 maps and for integer ones (exact there)."""
    wide = dtype == torch.float64 or not dtype.is_floating_point
    return torch.float64 if wide and torch.device(device).type in ("cpu", "cuda") else torch.float32


def distinct_counts(values: torch.Tensor, anomalous_values: torch.Tensor, weights: np.ndarray):
    """(distinct ascending values, normal count, anomalous count, PRO weight sum) of each distinct
    value of ``values`` (flat), where ``anomalous_values`` are the ground-truth pixels' values
    (also in ``values``) with their PRO ``weights`` in pixel order; each value's weights are summed
    in that order (one float order on every run and every device). On the CPU by one numpy sort, on
    other devices by torch.unique there."""
    if values.device.type == "cpu":
        s = np.sort(values.numpy())
        first = np.empty(s.size, dtype=bool)
        first[0] = True
        np.not_equal(s[1:], s[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        uniq = s[starts]
        total = np.diff(np.append(starts, s.size))
        pos = np.searchsorted(uniq, anomalous_values.numpy())
        anomalous = np.bincount(pos, minlength=uniq.size)
        pro = np.bincount(pos, weights=weights, minlength=uniq.size) if pos.size else np.zeros(uniq.size)
        return (torch.from_numpy(uniq.astype(np.float64)), torch.from_numpy(total - anomalous),
                torch.from_numpy(anomalous), torch.from_numpy(pro))
    uniq, total = torch.unique(values, return_counts=True)
    n = uniq.numel()
    anomalous = torch.zeros(n, dtype=torch.int64, device=uniq.device)
    pro = torch.zeros(n, dtype=torch.float64, device=uniq.device)
    if anomalous_values.numel():
        # the anomalous pixels' distinct score indices, found on the device; their PRO weights are
        # summed on the host in pixel order (deterministic float sums) and scattered back
        idx, inv = torch.unique(torch.searchsorted(uniq, anomalous_values), return_inverse=True)
        anomalous[idx] = torch.bincount(inv, minlength=idx.numel())
        pro[idx] = torch.from_numpy(np.bincount(inv.cpu().numpy(), weights=weights,
                                                minlength=idx.numel())).to(uniq.device)
    return uniq.double(), total - anomalous, anomalous, pro


def _anomalous_bounds(values: torch.Tensor, anomalous_values: torch.Tensor):
    """(pixels, distinct anomalous values' count, each anomalous pixel's value index, and per
    distinct anomalous value the number of scores below it and at or below it), numpy arrays.
    CPU: numpy, ``values`` sorted in place; other devices: torch there, small arrays to the host."""
    if values.device.type == "cpu":
        s, a = values.numpy(), anomalous_values.numpy()
        s.sort()
        uniq = np.unique(a)
        return s.size, uniq.size, np.searchsorted(uniq, a), np.searchsorted(s, uniq, side="left"), \
            np.searchsorted(s, uniq, side="right")
    return _anomalous_bounds_torch(values, anomalous_values)


def _anomalous_bounds_torch(values: torch.Tensor, anomalous_values: torch.Tensor):
    """``_anomalous_bounds`` by torch on the values' device (GPUs); ``values`` left as they are."""
    s = torch.sort(values).values
    uniq = torch.unique(anomalous_values)
    host = [t.cpu().numpy() for t in (torch.searchsorted(uniq, anomalous_values), torch.searchsorted(s, uniq),
                                       torch.searchsorted(s, uniq, right=True))]
    return s.numel(), uniq.numel(), *host


def exact_counts(values: torch.Tensor, anomalous_values: torch.Tensor, weights: np.ndarray) -> dict[str, np.ndarray]:
    """The exact metrics' counts of held scores (flat, this accumulator's own: on the CPU sorted in
    place), in as few groups as keep every metric exact: one per distinct anomalous value (with
    the normal pixels tied to it) and one per run of normal pixels between two of them. Inside
    such a run the ROC and PRO curves are flat (no true positive is gained) and precision and F1
    only fall, so merging the run changes no AUROC, AP, F1-max or AUPRO (their areas up to float
    rounding). After one sort of the scores the work is in the anomalous pixels, not in every
    distinct score (``distinct_counts``'s arrays are as long as the scores are distinct)."""
    if not anomalous_values.numel():
        return {"normal": np.array([values.numel()]), "anomalous": np.zeros(1, dtype=np.int64), "pro": np.zeros(1)}
    n, k, pos, lo, hi = _anomalous_bounds(values, anomalous_values)
    anomalous = np.bincount(pos, minlength=k)
    pro = np.bincount(pos, weights=weights, minlength=k)  # each value's weights summed in pixel order
    normal = np.empty(2 * k + 1, dtype=np.int64)  # the run below the first, the first, a run, ..., the run above
    normal[0] = lo[0]
    normal[1::2] = hi - lo - anomalous
    normal[2:-1:2] = lo[1:] - hi[:-1]
    normal[-1] = n - hi[-1]
    anom = np.zeros(2 * k + 1, dtype=np.int64)
    anom[1::2] = anomalous
    pro_all = np.zeros(2 * k + 1)
    pro_all[1::2] = pro
    keep = (normal > 0) | (anom > 0)
    return {"normal": normal[keep], "anomalous": anom[keep], "pro": pro_all[keep]}


class PixelMetricAccumulator:
    """Accumulates pixel statistics batch by batch; compute() gives the four pixel metrics.

    ``exact_pixels``: up to this many pixel scores are held as they come and counted exactly, in
    one sort, when the metrics are computed (a validation set's coarse maps: exact figures, and a
    fraction of the per-batch binning's cost); past it, what is held goes into the adaptive bins
    and streaming takes over. 0 (the default): every batch goes into the bins.
    """

    def __init__(self, num_bins: int = 65536, aupro_fpr_limit: float = 0.3, exact_pixels: int = 0):
        if int(num_bins) != num_bins or num_bins < 2:
            raise ConfigError("num_bins", f"must be an integer >= 2, got {num_bins}")
        if int(exact_pixels) != exact_pixels or exact_pixels < 0:
            raise ConfigError("exact_pixels", f"must be an integer >= 0, got {exact_pixels}")
        self.aupro_fpr_limit = check_fpr_limit(aupro_fpr_limit)
        self.exact_pixels = int(exact_pixels)
        self.bins = AdaptiveBins(int(num_bins))
        self.reset()

    def reset(self) -> None:
        self.bins.reset()
        self.num_regions = 0
        self._held: list[tuple[torch.Tensor, torch.Tensor, np.ndarray]] = []  # (values, anomalous values, weights)
        self._held_pixels = 0

    @property
    def nbytes(self) -> int:
        """Bytes of accumulated state: the bins (at most bins.max_nbytes) and the scores held."""
        held = sum(v.numel() * v.element_size() + a.numel() * a.element_size() + w.nbytes for v, a, w in self._held)
        return self.bins.nbytes + held

    @property
    def exact(self) -> bool:
        """True while the metrics equal the exact ones (scores held, or bins of one score each).
        Once streaming, scores still held go into the bins first (as ``compute`` would put them):
        they can merge bins, so the answer holds for what has been added so far."""
        if len(self.bins) and self._held:
            self._flush()
        return len(self.bins) == 0 or self.bins.exact

    def update(self, anomaly_map: torch.Tensor, mask: torch.Tensor,
               weights: tuple[np.ndarray, int] | None = None) -> None:
        """anomaly_map: (B,H,W) float; mask: (B,H,W) bool, same device. weights: (each mask pixel's
        curve weight, in row-major order image by image, and the regions they make up) in place of
        PRO's 1 / region size and the mask's 8-connected regions (sPRO: adtrain.metrics.spro)."""
        if anomaly_map.numel() == 0:
            return
        values = anomaly_map.detach()
        values = values.to(score_dtype(values.dtype, values.device))
        if not bool(torch.isfinite(values).all()):
            raise AdtrainError("anomaly map contains NaN or inf values; metrics need finite scores")
        has_defect = mask.flatten(1).any(dim=1)
        given, weights = weights, np.zeros(0)
        anomalous = values.new_zeros(0)
        if bool(has_defect.any()):
            defect_masks = mask[has_defect]
            weights, regions = region_weights(defect_masks.cpu().numpy()) if given is None else given
            anomalous = values[has_defect.to(values.device)][defect_masks.to(values.device)]
            self.num_regions += regions
        flat = values.reshape(-1)
        if self.exact_pixels and flat.data_ptr() == anomaly_map.data_ptr():
            flat = flat.clone()  # held past this call: not a view of the caller's map
        self._held.append((flat, anomalous, weights))
        self._held_pixels += values.numel()
        if self._held_pixels > self.exact_pixels:
            self._flush()

    def _take_held(self) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        held, self._held, self._held_pixels = self._held, [], 0
        if len(held) == 1:
            return held[0]
        dtype = torch.float32 if all(v.dtype == torch.float32 for v, _, _ in held) else torch.float64
        return (torch.cat([v.to(dtype) for v, _, _ in held]), torch.cat([a.to(dtype) for _, a, _ in held]),
                np.concatenate([w for _, _, w in held]))

    def _flush(self) -> None:
        """What is held into the bins (streaming from here on)."""
        if self._held:
            self.bins.add(*distinct_counts(*self._take_held()))

    def _counts(self) -> dict[str, np.ndarray]:
        if len(self.bins) or not self._held:
            self._flush()
            return self.bins.counts
        values, anomalous, weights = self._take_held()
        self._held, self._held_pixels = [(values, anomalous, weights)], values.numel()  # kept: compute() may repeat
        return exact_counts(values, anomalous, weights)

    def compute(self) -> dict[str, float | None]:
        c = self._counts()
        if c["anomalous"].sum() == 0:
            return dict.fromkeys(PIXEL_KEYS)
        pos, neg = c["anomalous"], c["normal"]
        return {
            "pixel_auroc": auroc_from_counts(pos, neg),
            "pixel_ap": ap_from_counts(pos, neg),
            "pixel_f1max": f1max_from_counts(pos, neg),
            "pixel_aupro": pro_auc_from_counts(
                neg, c["pro"], self.num_regions, self.aupro_fpr_limit
            ),
        }

    def pro_aucs(self, fpr_limits) -> list[float | None]:
        """The normalised area under the (per-region weighted) overlap curve up to each limit."""
        c = self._counts()
        return [pro_auc_from_counts(c["normal"], c["pro"], self.num_regions, check_fpr_limit(limit))
                for limit in fpr_limits]

    def error_bounds(self) -> dict[str, float]:
        """Largest possible |streaming - exact| of pixel_auroc, pixel_ap, pixel_f1max and pixel_aupro
        (0.0 while exact)."""
        if not len(self.bins):
            return dict.fromkeys(("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"), 0.0)
        self._flush()
        return self.bins.error_bounds(self.num_regions, self.aupro_fpr_limit)
