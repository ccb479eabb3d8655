"""Patch-level helpers shared by the feature-matching methods (PatchCore, CFA, DFM): the
frozen extractor, locally aggregated multi-layer patch features, and the score-map blur."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

from adtrain.errors import ConfigError


#: the blur's border rule, in scipy.ndimage's names: ``reflect`` (d c b a | a b c d, scipy's
#: default: the official PatchCore and CFA code blur with ``scipy.ndimage.gaussian_filter``) or
#: ``mirror`` (d c b | a b c d: torch's and kornia's "reflect", anomalib's blur)
BLUR_MODES = ("reflect", "mirror")


def check_blur_mode(mode: str, key: str = "method.blur_mode") -> str:
    if mode not in BLUR_MODES:
        raise ConfigError(key, f"must be one of {BLUR_MODES} (scipy.ndimage's border names), got {mode!r}")
    return mode


def border_index(n: int, radius: int, mode: str = "reflect", device=None) -> torch.Tensor:
    """The source index of each of the n + 2 radius padded positions, scipy.ndimage's rule for
    ``mode`` at any radius (past the edge the reflection repeats, with period 2n or 2n - 2)."""
    i = torch.arange(-radius, n + radius, device=device)
    if mode == "reflect":
        i = i.remainder(2 * n)
        return torch.where(i >= n, 2 * n - 1 - i, i)
    if n == 1:
        return torch.zeros_like(i)
    i = i.remainder(2 * n - 2)
    return torch.where(i >= n, 2 * n - 2 - i, i)


def gaussian_blur2d(x: torch.Tensor, sigma: float = 4.0, mode: str = "reflect") -> torch.Tensor:
    """Separable Gaussian blur of (B,C,H,W) as ``scipy.ndimage.gaussian_filter(mode=mode)``:
    kernel 2*int(4*sigma+0.5)+1 (truncate=4), borders by ``mode`` (``BLUR_MODES``) at any size."""
    check_blur_mode(mode)
    if sigma <= 0:
        return x
    radius = int(4.0 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-(t * t) / (2.0 * sigma * sigma))
    kernel = kernel / kernel.sum()
    b, c, h, w = x.shape
    y = x.reshape(b * c, 1, h, w).float()
    y = F.conv2d(y[..., border_index(w, radius, mode, x.device)], kernel.view(1, 1, 1, -1))
    y = F.conv2d(y[..., border_index(h, radius, mode, x.device), :], kernel.view(1, 1, -1, 1))
    return y.reshape(b, c, h, w)


@lru_cache(maxsize=64)
def _axis_operator(n: int, full: int, sigma: float, out: int, mode: str = "reflect") -> torch.Tensor:
    """(out, n): along one axis, the bilinear resize n -> full, the blur's pass and the area
    average full -> out, found by passing the unit vectors through the very same ops."""
    with torch.autocast("cpu", enabled=False):  # fp32 (cached: a CPU autocast's bf16 blur was kept for good)
        x = torch.eye(n).view(n, 1, n, 1)
        x = F.interpolate(x, size=(full, 1), mode="bilinear", align_corners=False)  # width 1 -> 1: identity
        x = gaussian_blur2d(x, sigma, mode)  # the width-1 pass sums the normalised kernel: identity
        x = F.adaptive_avg_pool2d(x, (out, 1))
    return x.view(n, out).t().contiguous()


@lru_cache(maxsize=64)
def _axis_operator_on(n: int, full: int, sigma: float, out: int, device: str, mode: str = "reflect") -> torch.Tensor:
    """``_axis_operator`` kept on ``device`` (no host copy per batch)."""
    return _axis_operator(n, full, sigma, out, mode).to(device)


def reduced_map(patch_scores: torch.Tensor, size, sigma: float, out_size, mode: str = "reflect") -> torch.Tensor:
    """``adaptive_avg_pool2d(gaussian_blur2d(interpolate(patch_scores, size), sigma, mode), out_size)``
    without the full-size intermediates: resize, blur and area average are each linear and
    separable, so the result is A_h S A_w^T with two small operators (equal up to float rounding),
    in fp32 under any autocast. (B,h,w) or (B,1,h,w) -> (B,1,*out_size) fp32. ``out_size`` =
    ``size``: the full-size blurred map (``upsampled_map``); smaller: the validation's coarse maps
    (methods/base.py)."""
    if patch_scores.ndim == 4:
        patch_scores = patch_scores[:, 0]
    h, w = patch_scores.shape[-2:]
    dev = str(patch_scores.device)
    a_h = _axis_operator_on(int(h), int(size[0]), float(sigma), int(out_size[0]), dev, mode)
    a_w = _axis_operator_on(int(w), int(size[1]), float(sigma), int(out_size[1]), dev, mode)
    with torch.autocast(patch_scores.device.type, enabled=False):
        return torch.matmul(torch.matmul(a_h, patch_scores.float()), a_w.t()).unsqueeze(1)


def upsampled_map(patch_scores: torch.Tensor, size, sigma: float, mode: str = "reflect") -> torch.Tensor:
    """``gaussian_blur2d(interpolate(patch_scores, size, bilinear), sigma, mode)``, the score maps of
    PatchCore, CFA and DFM, as two small matrix products (``reduced_map``): the same map up to
    float rounding (a few fp32 ulps), without the 33-tap convolutions over every full-size map
    (2.77 -> 0.04 ms of CPU time per 224 x 224 map, docs/BENCHMARKS.md)."""
    return reduced_map(patch_scores, size, sigma, size, mode)


def check_pool_size(pool_size) -> int:
    """method.pool_size: an odd whole number >= 1 (the pooling keeps the grid's size)."""
    if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1 or pool_size % 2 == 0:
        raise ConfigError("pool_size", f"must be an odd integer >= 1, got {pool_size!r}")
    return pool_size


def pooled_concat(feats: Mapping[str, torch.Tensor], layers: Sequence[str], pool_size: int) -> torch.Tensor:
    """Each layer avg-pooled (pool_size, stride 1, same padding), resized (bilinear) to the
    first layer's grid, concatenated over channels: (B, sum C, h, w) fp32, channels-last in
    memory: on the CPU the pooling and the resize run 5-6x faster so, with the same values to
    the bit (docs/BENCHMARKS.md), and the patch rows (``permute(0, 2, 3, 1)``) are then a view."""
    out, grid = [], None
    for name in layers:
        f = feats[name].float().contiguous(memory_format=torch.channels_last)
        if pool_size > 1:
            f = F.avg_pool2d(f, pool_size, stride=1, padding=pool_size // 2)
        if grid is None:
            grid = f.shape[-2:]
        elif f.shape[-2:] != grid:
            f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
        out.append(f)
    return torch.cat(out, dim=1).contiguous(memory_format=torch.channels_last)


def frozen_extractor(backbone, layers, extractor):
    """The given extractor, or a frozen one built from the backbone config for ``layers``."""
    if extractor is not None:
        return extractor
    if backbone is None:
        raise ConfigError("backbone", "missing (give a backbone config node or an extractor)")
    from adtrain.backbones import build_extractor

    return build_extractor(backbone, list(layers), frozen=True)  # the models pass layer_names'
