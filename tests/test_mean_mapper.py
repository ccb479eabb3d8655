"""method.embed_dims: the official PatchCore code's descriptor, against its own arithmetic written out
(unfold, adaptive_avg_pool1d per layer, resize, stack, adaptive_avg_pool1d), as the official code
orders it (resizing the unfolded neighbourhoods before the mapping)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adtrain.errors import ConfigError
from adtrain.methods.patchcore import PatchcoreModel
from adtrain.methods.patchcore.mean_mapper import adaptive_mean, check_embed_dims, mean_mapped, patchified

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def official(feats: dict, layers, patchsize: int, pretrain: int, target: int) -> torch.Tensor:
    """patchcore-inspection's PatchMaker.patchify + the resize of the coarser layers' patches +
    Preprocessing (MeanMapper) + Aggregator, as (B, target, h, w)."""
    out, ref = [], None
    for name in layers:
        x = feats[name]
        b, c, h, w = x.shape
        unf = F.unfold(x, kernel_size=patchsize, padding=patchsize // 2)  # (B, C*p*p, h*w)
        p = unf.reshape(b, c, patchsize, patchsize, h, w)
        if ref is None:
            ref = (h, w)
        elif (h, w) != ref:  # the official code resizes the patches (B*C*p*p maps), then maps them
            p = F.interpolate(p.reshape(-1, 1, h, w), size=ref, mode="bilinear", align_corners=False)
            p = p.reshape(b, c, patchsize, patchsize, *ref)
        rows = p.permute(0, 4, 5, 1, 2, 3).reshape(b * ref[0] * ref[1], 1, -1)  # (N, 1, C*p*p)
        out.append(F.adaptive_avg_pool1d(rows, pretrain).squeeze(1))
    stacked = torch.stack(out, dim=1).reshape(len(out[0]), 1, -1)
    agg = F.adaptive_avg_pool1d(stacked, target).reshape(b, ref[0], ref[1], target)
    return agg.permute(0, 3, 1, 2)


@pytest.mark.parametrize("length,out", [(4608, 1024), (9216, 1024), (360, 1024), (10, 3), (7, 7), (2048, 1024)])
def test_adaptive_mean_is_adaptive_avg_pool1d(length, out):
    x = torch.randn(3, length, 2, 2)
    ref = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(-1, 1, length), out).reshape(3, 2, 2, out)
    torch.testing.assert_close(adaptive_mean(x, out), ref.permute(0, 3, 1, 2), rtol=1e-6, atol=1e-6)


def test_patchified_is_unfolds_order():
    x = torch.randn(2, 5, 6, 7)
    ref = F.unfold(x, kernel_size=3, padding=1).reshape(2, 45, 6, 7)
    assert torch.equal(patchified(x, 3), ref)


@pytest.mark.parametrize("channels,dims", [((512, 1024), (1024, 1024)), ((40, 112), (1024, 1024)),
                                           ((12, 16), (64, 48))])
def test_mean_mapped_is_the_official_descriptor(channels, dims):
    g = torch.Generator().manual_seed(0)
    feats = {"a": torch.randn(10, channels[0], 8, 8, generator=g), "b": torch.randn(10, channels[1], 4, 4, generator=g)}
    got = mean_mapped(feats, ["a", "b"], 3, dims)  # 10 images: two chunks
    assert got.shape == (10, dims[1], 8, 8)
    torch.testing.assert_close(got, official(feats, ["a", "b"], 3, *dims), rtol=1e-5, atol=1e-5)


def test_wrn50_sized_layers_give_the_official_1024_dims_and_differ_from_the_concatenation():
    """For WRN50's 512 + 1024 channels and [1024, 1024]: layer2's channels a 3x3 mean with its centre
    counted twice, layer3's 3x3 means averaged in adjacent pairs (the module docstring)."""
    g = torch.Generator().manual_seed(1)
    l2, l3 = torch.randn(2, 512, 6, 6, generator=g), torch.randn(2, 1024, 3, 3, generator=g)
    got = mean_mapped({"layer2": l2, "layer3": l3}, ["layer2", "layer3"], 3, (1024, 1024))
    weights = torch.full((3, 3), 0.1)
    weights[1, 1] = 0.2
    kernel = weights.expand(512, 1, 3, 3)
    torch.testing.assert_close(got[:, :512], F.conv2d(l2, kernel, padding=1, groups=512), rtol=1e-5, atol=1e-6)
    pooled3 = F.avg_pool2d(l3, 3, stride=1, padding=1)
    pairs = F.interpolate(pooled3.view(2, 512, 2, 3, 3).mean(2), size=(6, 6), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got[:, 512:], pairs, rtol=1e-5, atol=1e-6)


def test_patchcore_with_embed_dims_fits_scores_and_checks_its_value():
    from tests.test_patchcore_cfa_models import RESNET18, _normal, _with_patch

    torch.manual_seed(0)
    model = PatchcoreModel(RESNET18, coreset_ratio=0.5, embed_dims=[96, 64], memory={"backend": "torch"})
    for seed in range(2):
        model.add_batch(_normal(4, seed))
    model.build()
    assert model.memory.bank.shape[1] == 64
    model.eval()
    with torch.no_grad():
        normal, defect = model(_normal(2, 9)).pred_score, model(_with_patch(_normal(2, 9))).pred_score
    assert bool((defect > normal).all())
    for bad in ([1024], [0, 1024], [1024.0, 1024], "1024", True):
        with pytest.raises(ConfigError, match="embed_dims"):
            check_embed_dims(bad)
    assert check_embed_dims(None) is None and check_embed_dims([1024, 1024]) == (1024, 1024)


@pytest.mark.parametrize("channels,out,pool", [(512, 1024, 3), (1024, 1024, 3), (40, 1024, 3), (112, 1024, 3),
                                               (7, 5, 3), (3, 50, 5), (6, 4, 1)])
def test_mapped_is_the_adaptive_mean_of_the_unfolded_neighbourhoods(channels, out, pool):
    from adtrain.methods.patchcore.mean_mapper import mapped

    x = torch.randn(2, channels, 5, 6)
    torch.testing.assert_close(mapped(x, pool, out), adaptive_mean(patchified(x, pool), out), rtol=1e-5, atol=1e-6)


def test_mean_mapped_stays_fp32_under_bf16_autocast():
    """bf16-mixed runs: the descriptor's convolution is not lowered to bf16 (each bin's sum would keep
    8 bits), so it equals the fp32 one to the bit."""
    g = torch.Generator().manual_seed(2)
    feats = {"a": torch.randn(2, 64, 8, 8, generator=g), "b": torch.randn(2, 128, 4, 4, generator=g)}
    ref = mean_mapped(feats, ["a", "b"], 3, (128, 96))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mean_mapped(feats, ["a", "b"], 3, (128, 96))
    assert got.dtype == torch.float32 and torch.equal(got, ref)
