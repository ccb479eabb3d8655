"""AnomalyEvaluator: the one test-time evaluator every method uses."""

from __future__ import annotations

import numpy as np
import torch

from adtrain.errors import AdtrainError
from adtrain.metrics._arrays import check_finite, to_numpy
from adtrain.metrics.image import image_metrics
from adtrain.metrics.pixel import PIXEL_KEYS, PixelMetricAccumulator, score_dtype
from adtrain.metrics.spro import SproAccumulator

METRIC_KEYS = ("image_auroc", "image_ap", "image_f1max", *PIXEL_KEYS)


def _spatial(x: torch.Tensor, name: str, batch: int) -> torch.Tensor:
    """(B,1,H,W) or (B,H,W) -> (B,H,W)."""
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or x.shape[0] != batch:
        raise AdtrainError(f"{name} must be ({batch},1,H,W) or ({batch},H,W), got {tuple(x.shape)}")
    return x


def _pixel_scores(amap: torch.Tensor) -> torch.Tensor:
    """A map in the dtype its pixel scores are counted in (``score_dtype``): fp16 / bf16 widened to
    fp32, fp32 and fp64 as they come, integers exact in fp64. Cutting fp64 to fp32 here would tie
    scores that differ below fp32's precision (and the pixel threshold's decisions with them)."""
    return amap.to(score_dtype(amap.dtype, amap.device))


class AnomalyEvaluator:
    """Image metrics (exact, every score kept) and streaming pixel metrics (bounded memory).

    Images with label 1 and has_mask False count for image metrics only. Pixel metrics are
    None when the test set has no anomalous pixel; a metric is None when undefined (one class).
    Per-image records: `image_scores` (list[float]) and `image_labels` (list[int]).

    Image scores and labels stay on their device batch by batch (no host sync per batch); they
    come to the host once, when `image_scores` / `image_labels` or `compute()` first asks, and
    are checked (finite scores, labels 0/1) there.
    """

    def __init__(
        self, pixel_metrics: bool = True, num_bins: int = 65536, aupro_fpr_limit: float = 0.3,
        exact_pixels: int = 0, pixel_groups: int = 0, spro_groups: dict[str, list[str]] | None = None,
        pixel_threshold: float | None = None,
    ):
        self.pixel_metrics = bool(pixel_metrics)
        self.num_bins = int(num_bins)
        self.aupro_fpr_limit = float(aupro_fpr_limit)
        self.exact_pixels = int(exact_pixels)
        self.pixel = PixelMetricAccumulator(num_bins, aupro_fpr_limit, exact_pixels)
        #: pixel_groups: how many groups (0: none) to keep apart too, one accumulator each
        #: (``update_pixels(groups=...)``: each image's category in a task of several), read by
        #: ``compute_groups``; they share the exact_pixels budget
        self.pixel_groups = int(pixel_groups)
        #: spro_groups: {category: defect types} to compute AU-sPRO for (``update_pixels(spro=...)``,
        #: read by ``compute_spro``); None or {}: none
        self.spro_groups = dict(spro_groups or {})
        #: pixel_threshold: the pixels' decisions at it are counted too (``compute_pixels_at_threshold``)
        self.pixel_threshold = pixel_threshold
        self.reset()

    def reset(self) -> None:
        self.pixel.reset()
        self.groups: dict[str, PixelMetricAccumulator] = {}
        self.spro = SproAccumulator(self.spro_groups, self.num_bins, self.exact_pixels) if self.spro_groups else None
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (scores, labels) on device
        self._scores: list[float] = []
        self._labels: list[int] = []
        self._empty: list[torch.Tensor] = []  # per batch, on its device: anomalous images with an empty mask
        self._decided: list[torch.Tensor] = []  # per batch, on its device: tp, fp, fn, tn pixels at pixel_threshold

    def _sync(self) -> None:
        """The pending device batches -> host lists (one transfer each), checked."""
        if not self._pending:
            return
        scores = to_numpy(torch.cat([s.to(self._pending[0][0].device) for s, _ in self._pending]))
        labels = to_numpy(torch.cat([l.to(self._pending[0][1].device) for _, l in self._pending]), dtype=int)
        self._pending = []
        check_finite(scores, "pred_score")
        if labels.size and not ((labels == 0) | (labels == 1)).all():
            raise AdtrainError("label must be 0 (normal) or 1 (anomalous)")
        self._scores.extend(scores.tolist())
        self._labels.extend(labels.tolist())

    @property
    def image_scores(self) -> list[float]:
        self._sync()
        return self._scores

    @property
    def image_labels(self) -> list[int]:
        self._sync()
        return self._labels

    def update(
        self,
        pred_score: torch.Tensor,
        label: torch.Tensor,
        anomaly_map: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        has_mask: torch.Tensor | None = None,
    ) -> None:
        """Add a batch: pred_score (B,), label (B,), maps/masks (B,1,H,W), has_mask (B,) bool."""
        if isinstance(pred_score, torch.Tensor):  # as to_numpy: fp16/bf16 scores widened, float64 kept
            scores = pred_score.detach().reshape(-1)
            scores = (scores.float() if scores.is_floating_point() and scores.dtype != torch.float64
                      else scores.double()).clone()
        else:
            scores = torch.from_numpy(to_numpy(pred_score).reshape(-1))
        labels = (label.detach().reshape(-1).clone() if isinstance(label, torch.Tensor)
                  else torch.from_numpy(to_numpy(label, dtype=np.int64).reshape(-1)))
        if scores.numel() != labels.numel():
            raise AdtrainError(f"pred_score has {scores.numel()} values but label has {labels.numel()}")
        self._pending.append((scores, labels))
        self.update_pixels(anomaly_map, label, mask, has_mask)

    def update_pixels(self, anomaly_map, label, mask=None, has_mask=None, groups=None, spro=None) -> None:
        """Pixel statistics of a batch alone (its image scores added elsewhere, e.g. at epoch end);
        groups: each image's group name (kept apart too where ``pixel_groups``); spro: the batch's
        (spro_code, spro_fraction, categories, defect types), for AU-sPRO where ``spro_groups``."""
        if self.pixel_metrics and anomaly_map is not None:
            label = torch.as_tensor(label).reshape(-1)
            self._update_pixels(anomaly_map, label, mask, has_mask, groups if self.pixel_groups else None)
            if self.spro is not None and spro is not None:
                self.spro.update(_pixel_scores(_spatial(anomaly_map.detach(), "anomaly_map", label.numel())), label, *spro)

    def _update_pixels(self, anomaly_map, label, mask, has_mask, groups=None) -> None:
        batch = label.numel()
        amap = _pixel_scores(_spatial(anomaly_map.detach(), "anomaly_map", batch))
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
        if mask is not None:  # no host sync here: counted on the device, read once by empty_masks
            self._empty.append(((label.to(device) == 1) & valid & ~gt.flatten(1).any(dim=1)).sum())
        if groups is not None:
            names = list(groups)
            for g in sorted(set(names)):
                pick = valid & torch.tensor([n == g for n in names], device=device)
                if g not in self.groups:
                    self.groups[g] = PixelMetricAccumulator(self.num_bins, self.aupro_fpr_limit,
                                                            self.exact_pixels // self.pixel_groups)
                self.groups[g].update(amap[pick], gt[pick])
        if not bool(valid.all()):
            amap, gt = amap[valid], gt[valid]
        if self.pixel_threshold is not None and mask is not None:  # counted on the device, read once
            above = amap > self.pixel_threshold
            self._decided.append(torch.stack([(above & gt).sum(), (above & ~gt).sum(), (~above & gt).sum(),
                                              (~above & ~gt).sum()]))
        self.pixel.update(amap, gt)

    @property
    def empty_masks(self) -> int:
        """Anomalous images whose mask has no anomalous pixel at the map's size (an empty mask file,
        or a defect too small to survive the resize): pixel metrics count them as normal pixels."""
        return int(sum(int(c) for c in self._empty))

    def compute_groups(self) -> dict[str, dict]:
        """Each group's pixel metrics and whether they are exact ({} unless ``pixel_groups`` and
        groups were given)."""
        return {g: {**acc.compute(), "pixel_metrics_exact": bool(acc.exact) if acc.num_regions else None,
                    # a group can stream where the pooled figures are exact (it has a share of the budget)
                    "pixel_error_bounds": ({k: float(v) for k, v in acc.error_bounds().items()}
                                           if acc.num_regions else None)}
                for g, acc in sorted(self.groups.items())}

    def compute_pixels_at_threshold(self) -> dict | None:
        """The test pixels' decisions at ``pixel_threshold`` (images with ground truth): counts, recall
        (defect pixels caught), false-positive rate, precision, F1; None without a threshold or masks."""
        if self.pixel_threshold is None or not self._decided or not self.pixel_metrics:
            return None
        tp, fp, fn, tn = (int(v) for v in sum(c.cpu() for c in self._decided).tolist())

        def ratio(a, b):
            return a / b if b else None

        return {"threshold": float(self.pixel_threshold), "tp": tp, "fp": fp, "fn": fn, "tn": tn,
                "recall": ratio(tp, tp + fn), "false_positive_rate": ratio(fp, fp + tn),
                "precision": ratio(tp, tp + fp), "f1": ratio(2 * tp, 2 * tp + fp + fn) if tp + fn else None}

    def compute_spro(self) -> dict | None:
        """AU-sPRO (adtrain.metrics.spro.SproAccumulator.compute); None where not computed."""
        return self.spro.compute() if self.spro is not None and self.pixel_metrics else None

    def compute(self) -> dict[str, float | None]:
        """All seven metrics as floats in [0, 1] or None where undefined."""
        result = image_metrics(self.image_scores, self.image_labels)  # the one host sync
        if self.pixel_metrics:
            result.update(self.pixel.compute())
        else:
            result.update(dict.fromkeys(PIXEL_KEYS))
        return result
