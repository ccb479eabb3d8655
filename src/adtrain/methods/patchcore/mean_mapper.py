"""The official PatchCore code's patch descriptor (``method.embed_dims=[pretrain, target]``).

The default descriptor here (``patch_features.pooled_concat``, as anomalib's) averages each layer's
channels over the 3x3 neighbourhood and concatenates the layers: 1,536 dimensions for WRN50's
layer2 + layer3. The official code (amazon-science/patchcore-inspection) instead

1. *patchifies* each layer: the 3x3 neighbourhood of every position (zero padding), flattened
   channel-major into C * 9 values (``unfold``'s order: channel, then row, then column);
2. maps these to ``pretrain`` values by an adaptive mean over that flat axis (``MeanMapper``:
   ``F.adaptive_avg_pool1d`` over C * 9; bin i averages the values from floor(i L / out) to
   ceil((i + 1) L / out)); the coarser layers are resized (bilinear) to the first layer's grid;
3. stacks the layers and maps the L * ``pretrain`` values to ``target`` the same way
   (``Aggregator``): [1024, 1024] for WRN50 gives 1,024 dimensions (layer2's 512 channels, each a
   3x3 mean with its centre counted twice; layer3's 1,024 channels 3x3-averaged, adjacent pairs
   averaged).

Here the same means without the C * 9 x H x W unfolded tensor: a bin's flat values lie in one or a
few consecutive channels, and its sum over one channel's part is that channel convolved with a 3x3
kernel of ones where the bin takes its values; so each layer is one channel gather and one depthwise
convolution, then a division by the bin's count (``mapped``). The layers are resized after the
mapping (both are linear and act on different axes). Equal to the official arithmetic up to float
rounding (tests/test_mean_mapper.py). Traceable (exports).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

from adtrain.errors import ConfigError


def check_embed_dims(value, key: str = "embed_dims") -> tuple[int, int] | None:
    """method.embed_dims: null (pooled and concatenated) or [pretrain, target], two whole numbers >= 1."""
    if value is None:
        return None
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
        return int(value[0]), int(value[1])
    raise ConfigError(key, "must be null (each layer 3x3-averaged and concatenated) or [pretrain, target], "
                      f"two whole numbers >= 1 (the official code's [1024, 1024]), got {value!r}")


@lru_cache(maxsize=32)
def _bins(length: int, out: int, device: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(start (out,), count (out,), widest) of adaptive_avg_pool1d's bins over ``length`` values."""
    i = torch.arange(out, dtype=torch.long)
    start = (i * length) // out
    end = ((i + 1) * length + out - 1) // out
    count = end - start
    return start.to(device), count.to(device), int(count.max())


def adaptive_mean(x: torch.Tensor, out: int) -> torch.Tensor:
    """``F.adaptive_avg_pool1d`` over dim 1 of (B, L, ...) -> (B, out, ...): each bin's values summed
    in order, then divided by their count."""
    length = x.shape[1]
    start, count, widest = _bins(int(length), int(out), str(x.device))
    total = x.index_select(1, start)
    for j in range(1, widest):
        idx = torch.clamp(start + j, max=length - 1)
        term = x.index_select(1, idx)
        keep = (count > j).to(x.dtype).view(1, out, *([1] * (x.dim() - 2)))
        total = total + term * keep
    return total / count.to(x.dtype).view(1, out, *([1] * (x.dim() - 2)))


def patchified(x: torch.Tensor, pool_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C * p * p, H, W): each position's p x p neighbourhood (zero padding),
    flattened as ``F.unfold`` orders it (channel, then row, then column). ``mapped`` uses it only
    where it is the smaller tensor (a layer of few channels widened)."""
    if pool_size == 1:
        return x
    b, c, h, w = x.shape
    r = pool_size // 2
    xp = F.pad(x, (r, r, r, r))
    shifts = [xp[:, :, dy:dy + h, dx:dx + w] for dy in range(pool_size) for dx in range(pool_size)]
    return torch.stack(shifts, dim=2).reshape(b, c * pool_size * pool_size, h, w)


@lru_cache(maxsize=32)
def _bin_kernels(channels: int, pool_size: int, out: int, device: str):
    """For ``adaptive_mean(patchified(x), out)`` as a depthwise convolution: each bin's flat values
    (channel-major, p * p per channel) lie in at most ``m`` consecutive channels; per bin and each of
    those channels, the channel's index (clamped) and a p x p kernel of ones where the bin takes that
    channel's neighbourhood values. Returns (channel (out * m,), kernels (out * m, 1, p, p), count
    (out,), m)."""
    pp = pool_size * pool_size
    start, count, _ = _bins(channels * pp, out, "cpu")
    end = start + count
    first, last = start // pp, (end - 1) // pp
    m = int((last - first).max()) + 1
    c = first.unsqueeze(1) + torch.arange(m).unsqueeze(0)  # (out, m), past the last channel: masked out
    flat = c.unsqueeze(2) * pp + torch.arange(pp).view(1, 1, pp)  # (out, m, pp)
    kern = ((flat >= start.view(-1, 1, 1)) & (flat < end.view(-1, 1, 1))).float()
    chan = c.clamp(max=channels - 1).reshape(-1)
    return (chan.to(device), kern.view(out * m, 1, pool_size, pool_size).to(device), count.float().to(device), m)


def mapped(x: torch.Tensor, pool_size: int, out: int) -> torch.Tensor:
    """``adaptive_mean(patchified(x, pool_size), out)`` (B, out, H, W) without the (B, C p p, H, W)
    tensor where that is the larger (C p p > out): each bin's channels gathered and summed over its
    part of their neighbourhoods by one depthwise convolution (zero padding, as the unfold's), then
    divided by the bin's count."""
    b, c, h, w = x.shape
    if c * pool_size * pool_size <= out:  # widened (few channels): the neighbourhoods are the smaller tensor
        return adaptive_mean(patchified(x, pool_size), out)
    chan, kern, count, m = _bin_kernels(int(c), int(pool_size), int(out), str(x.device))
    parts = F.conv2d(x.index_select(1, chan), kern.to(x.dtype), padding=pool_size // 2, groups=kern.shape[0])
    if m > 1:
        parts = parts.view(b, out, m, h, w).sum(dim=2)
    return parts / count.to(x.dtype).view(1, out, 1, 1)


def mean_mapped(feats: Mapping[str, torch.Tensor], layers: Sequence[str], pool_size: int,
                dims: tuple[int, int]) -> torch.Tensor:
    """The official code's descriptor (module docstring): (B, target, h, w) fp32 at the first
    layer's grid, channels-last in memory (as ``pooled_concat``). In fp32 under any autocast (a
    bf16 convolution would round each bin's sum to 8 bits)."""
    pretrain, target = dims
    out, grid = [], None
    for name in layers:
        x = feats[name]
        with torch.autocast(x.device.type, enabled=False):
            f = mapped(x.float(), pool_size, pretrain)
        if grid is None:
            grid = f.shape[-2:]
        elif f.shape[-2:] != grid:  # resized channels-last: several times faster on the CPU
            f = F.interpolate(f.contiguous(memory_format=torch.channels_last), size=grid, mode="bilinear",
                              align_corners=False).contiguous()
        out.append(f)
    stacked = torch.cat(out, dim=1)  # (B, L * pretrain, h, w): the Aggregator's flattened stack
    return adaptive_mean(stacked, target).contiguous(memory_format=torch.channels_last)
