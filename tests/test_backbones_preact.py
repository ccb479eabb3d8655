"""Stage outputs before the final activation (FeatureExtractor(pre_activation=True), HETMM's
method.feature_tap=pre_relu): signed features, relu(pre) == the usual output bit for bit, the
network downstream unchanged; backbones without a final activation unaffected."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
import yaml

from adtrain.backbones import FeatureExtractor, build_extractor
from adtrain.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "src" / "adtrain" / "conf" / "backbone"
STAGES = {"layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4}
NETS = ["resnet18.tv_in1k", "wide_resnet50_2.tv_in1k"]


def pair(name, layers, **kw):
    """(post, pre) extractors with the same random weights. timm zero-initialises each block's last
    BN (its output is then the ReLU'd shortcut, >= 0): zero_init_last=False, and random BN statistics,
    make the pre-activation values signed, as with trained weights."""
    post = FeatureExtractor(name, STAGES, layers, pretrained=False, zero_init_last=False, **kw)
    g = torch.Generator().manual_seed(0)
    for m in post.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    pre = FeatureExtractor(name, STAGES, layers, pretrained=False, zero_init_last=False, pre_activation=True, **kw)
    pre.load_state_dict(post.state_dict())  # strict: the same keys (the tap adds no parameter or buffer)
    return post, pre


def images(n=2, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _check(a, b, layers):
    assert list(b) == layers
    for layer in layers:
        assert (b[layer] < 0).any() and (a[layer] >= 0).all(), layer
        assert torch.equal(torch.relu(b[layer]), a[layer]), layer


@pytest.mark.parametrize("layers", [["layer1", "layer2", "layer3"], ["layer1", "layer3"]], ids=["l123", "l13"])
@pytest.mark.parametrize("name", NETS)
def test_relu_of_pre_activation_is_the_usual_output_bit_for_bit(name, layers):
    post, pre = pair(name, layers)
    post.eval(), pre.eval()
    x = images()
    with torch.no_grad():  # eval: the batch-norm folded copies
        _check(post(x), pre(x), layers)
        assert pre._fused["count"] > 0 and post._fused["count"] == pre._fused["count"]
        post.fuse_batchnorm = pre.fuse_batchnorm = False  # eval: the batch norms as trained
        _check(post(x), pre(x), layers)
    # train mode: batch statistics, and every BN's running statistics updated alike (skipped stages too)
    post.train(), pre.train()
    _check(post(x), pre(x), layers)
    after_post, after_pre = post.state_dict(), pre.state_dict()
    assert all(torch.equal(after_post[k], after_pre[k]) for k in after_post)


def test_channels_first_too():
    layers = ["layer1", "layer2"]
    post, pre = pair("resnet18", layers, channels_last=False, frozen=True)
    with torch.no_grad():
        _check(post(images()), pre(images()), layers)


def test_only_requested_stages_are_tapped_and_the_next_stage_gets_the_relu():
    post, pre = pair("resnet18", ["layer1", "layer3"])
    names = [n for n, _ in pre.model.named_children()]
    assert names == ["conv1", "bn1", "act1", "maxpool", "layer1", "layer1_act", "layer2", "layer3"]
    assert isinstance(pre.model.layer1[-1].act2, torch.nn.Identity)
    assert isinstance(pre.model.layer2[-1].act2, torch.nn.ReLU)  # skipped stage: as it was
    assert isinstance(pre.model.layer3[-1].act2, torch.nn.Identity)  # deepest: nothing inserted after it
    assert not pre.model.layer1_act.inplace  # the returned tensor is never overwritten
    assert set(pre.state_dict()) == set(post.state_dict())
    # switching back gives the usual network, and on again the same taps
    x = images()
    with torch.no_grad():
        ref, signed = post(x), pre(x)
        pre.set_pre_activation(False)
        assert [n for n, _ in pre.model.named_children()] == [n for n, _ in post.model.named_children()]
        back = pre(x)
        pre.set_pre_activation(True)
        again = pre(x)
    assert all(torch.equal(back[k], ref[k]) and torch.equal(again[k], signed[k]) for k in ref)


def test_traced_and_copied_extractors_keep_the_taps():
    _, pre = pair("resnet18", ["layer1", "layer2"], frozen=True)
    x = images()
    with torch.no_grad():
        ref = pre(x)
        traced = torch.jit.trace(pre, (x,), strict=False)
        out = traced(x)
        copied = copy.deepcopy(pre)(x)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-5)  # traced: the unfused network
        assert torch.equal(copied[k], ref[k]) and (out[k] < 0).any()


def test_efficientnet_lite_is_unchanged_by_the_option(caplog):
    cfg = {**yaml.safe_load((CONF / "efficientnet_lite0.yaml").read_text()), "pretrained": False}
    layers = ["layer1", "layer2", "layer3"]
    torch.manual_seed(0)
    post = build_extractor(cfg, layers, frozen=True)
    with caplog.at_level(logging.DEBUG, logger="adtrain"):
        pre = build_extractor(cfg, layers, frozen=True, pre_activation=True)
    assert "changes nothing" in caplog.text
    pre.load_state_dict(post.state_dict())
    assert str(pre.model) == str(post.model)
    x = images()
    with torch.no_grad():
        a, b = post(x), pre(x)
    assert all(torch.equal(a[k], b[k]) for k in layers)
    assert any((a[k] < 0).any() for k in layers)  # linear bottleneck: signed already


def test_unknown_block_ending_in_an_activation_is_refused():
    with pytest.raises(ConfigError, match="method.feature_tap.*RegStage"):
        FeatureExtractor("regnetx_002", STAGES, ["layer1"], pretrained=False, pre_activation=True)
    FeatureExtractor("regnetx_002", STAGES, ["layer1"], pretrained=False)  # without the option: fine


def test_feature_cache_key_differs_between_taps(tmp_path):
    from adtrain.backbones.feature_cache import FeatureCache

    post, pre = pair("resnet18", ["layer1"], frozen=True)
    cache = FeatureCache(tmp_path / "f")
    x = images()
    assert cache.key(pre, x) != cache.key(post, x)
    pre.feature_cache = post.feature_cache = cache
    with torch.no_grad():
        a, b = post(x), pre(x)
    assert cache.misses == 2 and cache.hits == 0
    assert torch.equal(torch.relu(b["layer1"]), a["layer1"]) and (b["layer1"] < 0).any()
