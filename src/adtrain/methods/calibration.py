"""Per-image calibration of a routed model's outputs (continual ``per_task`` memories).

A model with one memory per task fits each task's threshold, normal-score median and map median
on that task's held-out normals. An image routed to task t is decided and displayed with task t's
values: ``routed_calibration`` (B, 3) = (threshold, score centre, map centre) of each image of the
last ``anomaly_output``, set by the routing (``memory_module.TaskMemoryMixin``). Metrics use the raw
scores and are unaffected. Without routing (one task, an export) it is None and the module's own
scalars apply, as before.
"""

from __future__ import annotations

import torch


def per_image(module, n: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(threshold, score centre, map centre), each (n,), for the images of the module's last
    ``anomaly_output`` when it was routed with every task calibrated; None otherwise."""
    cal = getattr(module, "routed_calibration", None)
    if cal is None or cal.shape[0] != n or not bool(torch.isfinite(cal[:, 0]).all()):
        return None
    cal = cal.to(device)
    return cal[:, 0], cal[:, 1], cal[:, 2]


def normalize_with(values: torch.Tensor, center: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``AnomalyModule.normalize`` with a centre and threshold per image ((B,) each, broadcast over
    the trailing dimensions of ``values``): 0 at the centre, 0.5 at the threshold; raw values where
    the threshold does not lie above the centre."""
    shape = (-1,) + (1,) * (values.dim() - 1)
    thr, center = threshold.view(shape), center.view(shape)
    ok = torch.isfinite(thr) & (thr - center > 0)
    return torch.where(ok, 0.5 * (values - center) / torch.where(ok, thr - center, torch.ones_like(thr)), values)
