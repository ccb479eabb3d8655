"""Validation's coarse pixel maps: anomaly maps area-averaged and masks max-pooled to at most
VAL_MAP_SIDE pixels a side, so a validation pass's pixel figures cost a fraction of the test's."""

from __future__ import annotations

import torch

#: validation pixel metrics on maps of at most this many pixels a side (the test's are full size)
VAL_MAP_SIDE = 64


def coarse_size(h: int, w: int) -> tuple[int, int]:
    """The validation map size of an (h, w) image: at most VAL_MAP_SIDE a side, aspect kept."""
    if max(h, w) <= VAL_MAP_SIDE:
        return int(h), int(w)
    return max(1, round(h * VAL_MAP_SIDE / max(h, w))), max(1, round(w * VAL_MAP_SIDE / max(h, w)))


def coarse_maps(amap: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps area-averaged and masks max-pooled (a coarse pixel is anomalous if any of its pixels
    is) to ``coarse_size`` of the image (the mask's size): validation's pixel figures at a fraction
    of the cost. A map already at that size (``validation_output``) is taken as it is."""
    size = coarse_size(*mask.shape[-2:])
    if tuple(amap.shape[-2:]) != size:
        amap = torch.nn.functional.adaptive_avg_pool2d(amap.float(), size)
    if tuple(mask.shape[-2:]) != size:
        mask = torch.nn.functional.adaptive_max_pool2d(mask.float(), size)
    return amap, mask
