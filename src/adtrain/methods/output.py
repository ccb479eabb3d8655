"""The one output type every torch model returns at inference."""

from __future__ import annotations

from typing import NamedTuple

import torch


class AnomalyOutput(NamedTuple):
    """anomaly_map: (B,1,H,W) at input resolution; pred_score: (B,) image scores."""

    anomaly_map: torch.Tensor
    pred_score: torch.Tensor


def concat(outs) -> AnomalyOutput:
    """The outputs of consecutive chunks of one batch as one fp32 output."""
    return AnomalyOutput(torch.cat([o.anomaly_map.float() for o in outs]),
                         torch.cat([o.pred_score.float() for o in outs]))
