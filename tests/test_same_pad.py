"""TF "same" convolutions without the padded input copy (adtrain.backbones.same_pad)."""

from __future__ import annotations

import sys

import pytest
import torch

from adtrain.backbones import FeatureExtractor
from adtrain.backbones.same_pad import StripConv2dSame, conv2d_same_strips, use_strip_padding

import timm.layers  # noqa: F401  (registers the submodule below)

_timm_same = sys.modules["timm.layers.conv2d_same"].conv2d_same  # timm's pad-then-convolve


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("shape", [
    # (channels in, out, groups, kernel, stride, dilation, height, width)
    (96, 96, 96, 3, 2, 1, 32, 32),    # depthwise 3x3 / 2 on an even size: pad 0 above, 1 below
    (3, 16, 1, 3, 2, 1, 64, 64),      # EfficientNet's stem
    (24, 24, 24, 5, 2, 1, 16, 16),    # depthwise 5x5 / 2: pad 1 above, 2 below
    (8, 8, 8, 5, 2, 1, 17, 14),       # odd height: symmetric there, asymmetric across
    (8, 12, 2, 3, 2, 1, 15, 15),      # odd sizes: symmetric, PyTorch's own padding
    (8, 8, 1, 3, 1, 1, 10, 9),        # stride 1: symmetric
    (8, 8, 8, 3, 2, 2, 20, 20),       # dilation 2
    (4, 4, 4, 3, 3, 1, 20, 22),       # stride 3: two missing rows/columns possible
    (4, 6, 1, 4, 2, 1, 12, 12),       # even kernel
    (8, 8, 8, 5, 2, 1, 2, 2),         # smaller than the kernel (a tiny method.image_size): padded first
    (3, 16, 1, 3, 2, 1, 1, 3),        # one row
])
def test_strips_equal_timm_pad_then_convolve_bit_for_bit(shape, channels_last):
    cin, cout, groups, k, s, d, h, w = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(2, cin, h, w, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin // groups, k, k, generator=g)
    bias = torch.randn(cout, generator=g)
    want = _timm_same(x, weight, bias, (s, s), (0, 0), (d, d), groups)
    got = conv2d_same_strips(x, weight, bias, (s, s), (d, d), groups)
    assert got.shape == want.shape
    assert torch.equal(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(memory_format=torch.channels_last)


def test_a_tf_efficientnet_inference_copy_uses_strips_with_the_same_features():
    torch.manual_seed(0)
    ext = FeatureExtractor("tf_efficientnet_lite0", {"layer1": 1, "layer2": 2, "layer3": 3},
                           ["layer1", "layer2", "layer3"], pretrained=False, frozen=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = ext(x)
    copy = ext._fused["model"]
    strips = [m for m in copy.modules() if isinstance(m, StripConv2dSame)]
    assert len(strips) == 4  # the stem and the stride-2 depthwise convs up to stride 16
    assert not any(isinstance(m, StripConv2dSame) for m in ext.model.modules())  # the model itself: timm's
    # the same copy with timm's Conv2dSame back: identical features
    same = type(next(m for m in ext.model.modules() if type(m).__name__ == "Conv2dSame"))
    for m in strips:
        m.__class__ = same
    with torch.no_grad():
        want = ext(x)
    for key in got:
        assert torch.equal(got[key], want[key]), key
    assert use_strip_padding(torch.nn.Conv2d(3, 3, 3)) == 0
