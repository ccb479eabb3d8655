"""Streaming pixel-level metrics: AUROC, AP, F1-max and AUPRO from one set of adaptive bins.

State (adtrain.metrics.summary.AdaptiveBins): at most `num_bins` score bins with three channels,
`normal` (count of normal pixels), `anomalous` (count of ground-truth pixels) and `pro` (sum over
ground-truth pixels of 1 / size of their region). Memory does not grow with the test set. While
the test set has at most `num_bins` distinct scores the metrics are exact; past that, bins merge
by equal shares of pixel mass (not of score range, so heavy-tailed maps keep their resolution)
and `error_bounds()` bounds the difference to the exact values. Distinct scores and their counts
are found on the input's device and binned there; only the (few) anomalous pixels' indices
come to the CPU (for their regions), and the bins once, when the metrics are computed.
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


def _binning_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device supports it (exact scores), float32 otherwise (e.g. MPS)."""
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


class PixelMetricAccumulator:
    """Accumulates pixel statistics batch by batch; compute() gives the four pixel metrics."""

    def __init__(self, num_bins: int = 65536, aupro_fpr_limit: float = 0.3):
        if int(num_bins) != num_bins or num_bins < 2:
            raise ConfigError("num_bins", f"must be an integer >= 2, got {num_bins}")
        self.aupro_fpr_limit = check_fpr_limit(aupro_fpr_limit)
        self.bins = AdaptiveBins(int(num_bins))
        self.num_regions = 0

    def reset(self) -> None:
        self.bins.reset()
        self.num_regions = 0

    @property
    def nbytes(self) -> int:
        """Bytes of accumulated state (at most bins.max_nbytes, whatever the data seen)."""
        return self.bins.nbytes

    def update(self, anomaly_map: torch.Tensor, mask: torch.Tensor) -> None:
        """anomaly_map: (B,H,W) float; mask: (B,H,W) bool, same device."""
        if anomaly_map.numel() == 0:
            return
        values = anomaly_map.detach().to(_binning_dtype(anomaly_map.device))
        if not bool(torch.isfinite(values).all()):
            raise AdtrainError("anomaly map contains NaN or inf values; metrics need finite scores")
        uniq, inverse = torch.unique(values, return_inverse=True)  # inverse: (B,H,W)
        n = uniq.numel()
        total = torch.bincount(inverse.reshape(-1), minlength=n)
        anomalous = torch.zeros(n, dtype=torch.int64, device=uniq.device)
        pro = torch.zeros(n, dtype=torch.float64, device=uniq.device)
        has_defect = mask.flatten(1).any(dim=1)
        if bool(has_defect.any()):
            defect_masks = mask[has_defect]
            weights, regions = region_weights(defect_masks.cpu().numpy())
            # the anomalous pixels' distinct score indices, found on the device; their PRO weights
            # are summed on the host in pixel order (deterministic float sums) and scattered back
            pos = inverse[has_defect.to(inverse.device)][defect_masks.to(inverse.device)]
            idx, inv = torch.unique(pos, return_inverse=True)
            anomalous[idx] = torch.bincount(inv, minlength=idx.numel())
            pro[idx] = torch.from_numpy(np.bincount(inv.cpu().numpy(), weights=weights,
                                                    minlength=idx.numel())).to(uniq.device)
            self.num_regions += regions
        self.bins.add(uniq, total - anomalous, anomalous, pro)

    def compute(self) -> dict[str, float | None]:
        c = self.bins.counts
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

    def error_bounds(self) -> dict[str, float]:
        """Largest possible |streaming - exact| of pixel_auroc and pixel_aupro (0.0 while exact)."""
        return self.bins.error_bounds(self.num_regions, self.aupro_fpr_limit)
