"""The one output type every torch model returns at inference."""

from __future__ import annotations

from typing import NamedTuple

import torch


class AnomalyOutput(NamedTuple):
    """anomaly_map: (B,1,H,W) at input resolution; pred_score: (B,) image scores."""

    anomaly_map: torch.Tensor
    pred_score: torch.Tensor
