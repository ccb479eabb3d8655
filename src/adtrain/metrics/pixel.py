"""Streaming pixel-level metrics: AUROC, AP, F1-max and AUPRO from one shared histogram.

State is a fixed-size histogram with three channels over the same bin edges:
`normal` (count of normal pixels), `anomalous` (count of ground-truth pixels) and `pro`
(sum over ground-truth pixels of 1 / size of their region). Memory does not grow with the
test set. Binning is done on the input's device; only bin counts and the (few) anomalous
pixels' bin indices come to the CPU.
"""

from __future__ import annotations

import numpy as np
import torch

from adtrain.metrics.aupro import check_fpr_limit, region_weights
from adtrain.metrics.curves import (
    ap_from_counts,
    auroc_from_counts,
    f1max_from_counts,
    pro_auc_from_counts,
)
from adtrain.metrics.histogram import StreamingHistogram

PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")


def _binning_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device supports it (exact bin edges), float32 otherwise (e.g. MPS)."""
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


class PixelMetricAccumulator:
    """Accumulates pixel statistics batch by batch; compute() gives the four pixel metrics."""

    def __init__(self, num_bins: int = 65536, aupro_fpr_limit: float = 0.3):
        self.aupro_fpr_limit = check_fpr_limit(aupro_fpr_limit)
        self.hist = StreamingHistogram(
            num_bins, {"normal": np.int64, "anomalous": np.int64, "pro": np.float64}
        )
        self.num_regions = 0

    def reset(self) -> None:
        self.hist.reset()
        self.num_regions = 0

    @property
    def nbytes(self) -> int:
        """Bytes of accumulated state (constant: it does not depend on the data seen)."""
        return self.hist.nbytes

    def update(self, anomaly_map: torch.Tensor, mask: torch.Tensor) -> None:
        """anomaly_map: (B,H,W) float; mask: (B,H,W) bool, same device."""
        if anomaly_map.numel() == 0:
            return
        values = anomaly_map.detach().to(_binning_dtype(anomaly_map.device))
        vmin, vmax = (float(v) for v in torch.aminmax(values.reshape(-1)))
        self.hist.ensure_range(vmin, vmax)
        idx = self.hist.bin_index(values)
        # all pixels binned on the device; anomalous ones are moved from `normal` below
        self.hist.add_indices("normal", idx)
        has_defect = mask.flatten(1).any(dim=1).cpu()
        if not bool(has_defect.any()):
            return
        defect_masks = mask[has_defect.to(mask.device)]
        weights, n = region_weights(defect_masks.cpu().numpy())
        pos_idx = idx[has_defect.to(idx.device)][defect_masks].cpu().numpy()
        pos_counts = np.bincount(pos_idx, minlength=self.hist.num_bins)
        self.hist.counts["normal"] -= pos_counts
        self.hist.counts["anomalous"] += pos_counts
        self.hist.add_indices("pro", pos_idx, weights=weights)
        self.num_regions += n

    def compute(self) -> dict[str, float | None]:
        c = self.hist.counts
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
