"""Evaluation metrics for all methods: exact image metrics, streaming pixel metrics, AUPRO."""

from adtrain.metrics.aupro import aupro
from adtrain.metrics.evaluator import METRIC_KEYS, AnomalyEvaluator
from adtrain.metrics.image import auroc, average_precision, f1_max, image_metrics
from adtrain.metrics.pixel import PixelMetricAccumulator
from adtrain.metrics.summary import AdaptiveBins

__all__ = [
    "AdaptiveBins",
    "METRIC_KEYS",
    "AnomalyEvaluator",
    "PixelMetricAccumulator",
    "aupro",
    "auroc",
    "average_precision",
    "f1_max",
    "image_metrics",
]
