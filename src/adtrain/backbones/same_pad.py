"""TensorFlow "same" convolutions without padding the whole input (CPU inference copies).

timm's ``Conv2dSame`` (the TF-ported EfficientNets: ``tf_efficientnet_lite0`` and its kin) pads
each stride-2 convolution's input with ``F.pad`` before convolving: for an asymmetric pad (e.g.
0 above, 1 below for a 3x3 kernel on an even size) a full copy of the input, by far the largest
tensor of that block (the expanded channels before a depthwise convolution). On a CPU that copy
is memory-bound: 6.1 of 40 s of an STFPM test on EfficientNet-Lite0 under cProfile
(docs/BENCHMARKS.md, "Projected exact search").

``conv2d_same_strips`` computes the same output without the copy: PyTorch's symmetric padding
of the smaller side (pad top/left) gives every output row and column whose window does not reach
the larger bottom/right pad, identical to TF's; the last row and column (whose windows do) come
from two small convolutions of padded edge strips. The output is assembled in one tensor (a
copy of the output: a quarter of the input's size at stride 2). Every output element is the
same sum of the same products: the result is bit-identical (tests/test_same_pad.py), so this
runs in the extractors' private inference copies (``backbones.extractor``), on the CPU only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.padding import get_same_padding


def conv2d_same_strips(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       stride: tuple[int, int], dilation: tuple[int, int], groups: int) -> torch.Tensor:
    """``F.conv2d(F.pad(x, tf_same_padding), weight, bias, stride, 0, dilation, groups)`` without
    the padded copy of x (module docstring)."""
    n, _, h, w = x.shape
    kh, kw = weight.shape[-2:]
    (sh, sw), (dh, dw) = stride, dilation
    ph, pw = get_same_padding(h, kh, sh, dh), get_same_padding(w, kw, sw, dw)  # TF's totals
    pt, pl = ph // 2, pw // 2
    if h + 2 * pt < (kh - 1) * dh + 1 or w + 2 * pl < (kw - 1) * dw + 1:  # input smaller than the kernel: pad
        return F.conv2d(F.pad(x, (pl, pw - pl, pt, ph - pt)), weight, bias, stride, 0, dilation, groups)
    main = F.conv2d(x, weight, bias, stride, (pt, pl), dilation, groups)
    if ph == 2 * pt and pw == 2 * pl:  # symmetric: PyTorch's padding is TF's
        return main
    ho, wo = -(-h // sh), -(-w // sw)
    hm, wm = main.shape[-2:]
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    out = torch.empty((n, main.shape[1], ho, wo), dtype=main.dtype, device=main.device, memory_format=fmt)
    out[:, :, :hm, :wm] = main
    if hm < ho:  # bottom rows, every column: their windows from row hm * sh - pt down, padded below
        strip = x[:, :, hm * sh - pt:, :]
        rows = (ho - hm - 1) * sh + (kh - 1) * dh + 1
        strip = F.pad(strip, (pl, pw - pl, 0, rows - strip.shape[-2]))
        out[:, :, hm:, :] = F.conv2d(strip, weight, bias, stride, 0, dilation, groups)
    if wm < wo:  # right columns of the rows above
        strip = x[:, :, :, wm * sw - pl:]
        cols = (wo - wm - 1) * sw + (kw - 1) * dw + 1
        strip = F.pad(strip, (0, cols - strip.shape[-1], pt, ph - pt))
        out[:, :, :hm, wm:] = F.conv2d(strip, weight, bias, stride, 0, dilation, groups)[:, :, :hm]
    return out


class StripConv2dSame(torch.nn.Conv2d):
    """timm's Conv2dSame computed by ``conv2d_same_strips`` (same parameters, same output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d_same_strips(x, self.weight, self.bias, self.stride, self.dilation, self.groups)


def use_strip_padding(model: torch.nn.Module) -> int:
    """Make every timm Conv2dSame of ``model`` (a private inference copy) a StripConv2dSame, in
    place; the number replaced."""
    done = 0
    for mod in model.modules():
        if type(mod) is Conv2dSame:
            mod.__class__ = StripConv2dSame  # Conv2dSame holds nothing beyond nn.Conv2d's state
            done += 1
    return done
