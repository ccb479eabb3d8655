"""AU-sPRO: MVTec LOCO AD's saturated per-region overlap (Bergmann et al., IJCV 2022).

Each ground-truth region (one mask file; adtrain.data.regions) has a saturation area s, set by its
defect type. sPRO(t) of a region is min(TP(t) / s, 1): a region counts as found once s of its pixels
score above t, however large it is. The curve is the mean over the regions against the false-positive
rate of the pixels outside every region; AU-sPRO is its area up to an FPR limit, divided by the limit.
As in the dataset's official evaluation, it is computed for each defect type (LOCO: logical and
structural anomalies) with the category's good images, at the FPR limits SPRO_FPR_LIMITS (0.05 is
the one the paper reports), and averaged over the defect types.

Streaming: min(TP(t) / s, 1) is a sum over the region's pixels taken by descending score of
w_j = (min(j, s) - min(j - 1, s)) / s: the s highest-scoring pixels carry the region's whole weight.
With these weights in place of PRO's 1 / area, PixelMetricAccumulator counts the curve exactly (or
streams it, within its error bounds) as it does AUPRO. Tied scores cross a threshold together, so
which of them takes the weight changes nothing.

Resolution: the curve is taken where adtrain's other pixel metrics are (``metrics.resolution``). At
the run's image size (the default) each region keeps its saturation fraction s / area from the file's
resolution, and regions that vanish when the masks are resized are left out and counted
(``regions_lost``); with ``source`` the maps are brought back to the files' own size and the regions
read as they are, which is the official figure (adtrain.metrics.source_resolution).
"""

from __future__ import annotations

import numpy as np
import torch

from adtrain.metrics.pixel import PixelMetricAccumulator

#: the FPR limits of the official evaluation
SPRO_FPR_LIMITS = (0.01, 0.05, 0.1, 0.3, 1.0)


def spro_weights(scores: np.ndarray, code: np.ndarray, fractions: np.ndarray) -> tuple[np.ndarray, int, int]:
    """One image's ground-truth pixels (any region; row-major): their scores and region bits
    (``spro_code``), and the regions' saturation fractions -> (each pixel's weight, regions, regions
    with no pixel at this size)."""
    weights = np.zeros(scores.size, dtype=np.float64)
    regions = lost = 0
    for r in np.flatnonzero(fractions > 0):
        idx = np.flatnonzero((code >> r) & 1)
        if idx.size == 0:
            lost += 1
            continue
        s = float(fractions[r]) * idx.size
        order = idx[np.argsort(-scores[idx], kind="stable")]
        j = np.arange(1, idx.size + 1, dtype=np.float64)
        weights[order] += (np.minimum(j, s) - np.minimum(j - 1, s)) / s
        regions += 1
    return weights, regions, lost


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


class SproAccumulator:
    """AU-sPRO by (category, defect type): one PixelMetricAccumulator each, fed that type's images
    and the category's good images. groups: {category: defect types}; exact_pixels is shared."""

    def __init__(self, groups: dict[str, list[str]], num_bins: int = 65536, exact_pixels: int = 0,
                 fpr_limits=SPRO_FPR_LIMITS):
        self.groups = {str(c): [str(d) for d in types] for c, types in groups.items()}
        self.fpr_limits = tuple(float(x) for x in fpr_limits)
        n = max(1, sum(len(t) for t in self.groups.values()))
        self.acc = {(c, d): PixelMetricAccumulator(num_bins, 1.0, int(exact_pixels) // n)
                    for c, types in self.groups.items() for d in types}
        self.regions_lost = 0

    def update(self, anomaly_map: torch.Tensor, label, code: torch.Tensor, fractions: torch.Tensor,
               categories, defects) -> None:
        """A batch: maps (B,H,W), labels (B,), spro_code (B,H,W), spro_fraction (B,R), and each
        image's category and defect type."""
        label = torch.as_tensor(label).reshape(-1).tolist()
        has_regions = (fractions > 0).any(dim=1).tolist()
        feeds: dict[tuple, list[int]] = {}
        for i, (lab, cat, defect) in enumerate(zip(label, categories, defects)):
            # an anomalous image without ground truth is left out (its defect's pixels are not normal ones)
            keys = [(cat, d) for d in self.groups.get(cat, ())] if lab == 0 else \
                [(cat, defect)] if (cat, defect) in self.acc and has_regions[i] else []
            for key in keys:
                feeds.setdefault(key, []).append(i)
        if not feeds:
            return
        amap = anomaly_map.detach()
        code = code.to(amap.device)
        fractions = fractions.cpu().numpy()
        for key, rows in feeds.items():
            idx = torch.tensor(rows, device=amap.device)
            maps, codes = amap[idx], code[idx]
            gt = codes != 0
            weights, regions = [], 0
            with_regions = [k for k, has in enumerate(gt.flatten(1).any(dim=1).tolist()) if has]
            if with_regions:  # their maps and codes to the host once, not image by image
                host_maps, host_codes, host_gt = (t[with_regions].cpu().numpy() for t in (maps, codes, gt))
            for j, k in enumerate(with_regions):
                w, n, lost = spro_weights(host_maps[j][host_gt[j]].astype(np.float64), host_codes[j][host_gt[j]],
                                          fractions[rows[k]])
                weights.append(w)
                regions += n
                self.regions_lost += lost
            self.acc[key].update(maps, gt, (np.concatenate(weights) if weights else np.zeros(0), regions))

    @property
    def exact(self) -> bool:
        return all(a.exact for a in self.acc.values())

    def compute(self) -> dict | None:
        """{"fpr_limits", "by_category": {category: {defect type: {limit: AU-sPRO}, "mean": ...}},
        "mean": {limit: mean over categories}, "regions", "regions_lost", "exact"}; None without
        regions. A figure is None where undefined (no region of that type, no normal pixel)."""
        if not self.acc:
            return None
        keys = [f"{x:g}" for x in self.fpr_limits]
        by_category = {}
        for cat, types in self.groups.items():
            figures = {d: dict(zip(keys, self.acc[(cat, d)].pro_aucs(self.fpr_limits))) for d in types}
            figures["mean"] = {k: _mean([figures[d][k] for d in types]) for k in keys}
            by_category[cat] = figures
        return {
            "fpr_limits": list(self.fpr_limits),
            "by_category": by_category,
            "mean": {k: _mean([f["mean"][k] for f in by_category.values()]) for k in keys},
            "regions": int(sum(a.num_regions for a in self.acc.values())),
            "regions_lost": int(self.regions_lost),
            "exact": self.exact,
        }
