"""AnomalyEvaluator: the one test-time evaluator every method uses."""

from __future__ import annotations

import torch

from adtrain.errors import AdtrainError
from adtrain.metrics._arrays import check_finite, to_numpy
from adtrain.metrics.image import image_metrics
from adtrain.metrics.pixel import PIXEL_KEYS, PixelMetricAccumulator

METRIC_KEYS = ("image_auroc", "image_ap", "image_f1max", *PIXEL_KEYS)


def _spatial(x: torch.Tensor, name: str, batch: int) -> torch.Tensor:
    """(B,1,H,W) or (B,H,W) -> (B,H,W)."""
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or x.shape[0] != batch:
        raise AdtrainError(f"{name} must be ({batch},1,H,W) or ({batch},H,W), got {tuple(x.shape)}")
    return x


class AnomalyEvaluator:
    """Image metrics (exact, every score kept) and streaming pixel metrics (bounded memory).

    Images with label 1 and has_mask False count for image metrics only. Pixel metrics are
    None when the test set has no anomalous pixel; a metric is None when undefined (one class).
    Per-image records: `image_scores` (list[float]) and `image_labels` (list[int]).
    """

    def __init__(
        self, pixel_metrics: bool = True, num_bins: int = 65536, aupro_fpr_limit: float = 0.3
    ):
        self.pixel_metrics = bool(pixel_metrics)
        self.num_bins = int(num_bins)
        self.aupro_fpr_limit = float(aupro_fpr_limit)
        self.pixel = PixelMetricAccumulator(num_bins, aupro_fpr_limit)
        self.image_scores: list[float] = []
        self.image_labels: list[int] = []

    def reset(self) -> None:
        self.pixel.reset()
        self.image_scores = []
        self.image_labels = []

    def update(
        self,
        pred_score: torch.Tensor,
        label: torch.Tensor,
        anomaly_map: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        has_mask: torch.Tensor | None = None,
    ) -> None:
        """Add a batch: pred_score (B,), label (B,), maps/masks (B,1,H,W), has_mask (B,) bool."""
        scores = to_numpy(pred_score).reshape(-1)
        labels = to_numpy(label, dtype=int).reshape(-1)
        if scores.size != labels.size:
            raise AdtrainError(f"pred_score has {scores.size} values but label has {labels.size}")
        check_finite(scores, "pred_score")
        if labels.size and not ((labels == 0) | (labels == 1)).all():
            raise AdtrainError("label must be 0 (normal) or 1 (anomalous)")
        self.image_scores.extend(scores.tolist())
        self.image_labels.extend(labels.tolist())
        if self.pixel_metrics and anomaly_map is not None:
            self._update_pixels(anomaly_map, torch.as_tensor(label).reshape(-1), mask, has_mask)

    def _update_pixels(self, anomaly_map, label, mask, has_mask) -> None:
        batch = label.numel()
        amap = _spatial(anomaly_map.detach(), "anomaly_map", batch).float()
        device = amap.device
        if mask is None:  # no ground truth: only normal images' (empty) masks are known
            gt = torch.zeros_like(amap, dtype=torch.bool)
            valid = label.to(device) == 0
        else:
            gt = _spatial(mask.detach(), "mask", batch).to(device) > 0.5
            if gt.shape != amap.shape:
                raise AdtrainError(
                    f"mask {tuple(gt.shape)} and anomaly_map {tuple(amap.shape)} differ in size"
                )
            if has_mask is None:
                valid = torch.ones(batch, dtype=torch.bool, device=device)
            else:
                valid = torch.as_tensor(has_mask).reshape(-1).to(device=device, dtype=torch.bool)
                if valid.numel() != batch:
                    raise AdtrainError(f"has_mask has {valid.numel()} values, expected {batch}")
        if not bool(valid.all()):
            amap, gt = amap[valid], gt[valid]
        self.pixel.update(amap, gt)

    def compute(self) -> dict[str, float | None]:
        """All seven metrics as floats in [0, 1] or None where undefined."""
        result = image_metrics(self.image_scores, self.image_labels)
        if self.pixel_metrics:
            result.update(self.pixel.compute())
        else:
            result.update(dict.fromkeys(PIXEL_KEYS))
        return result
