"""Batch-norm folding of frozen extractors (adtrain.backbones.fuse)."""

from __future__ import annotations

import torch
from torch import nn

from adtrain.backbones import FeatureExtractor
from adtrain.backbones.fuse import fold_batchnorm

STAGES = {"layer1": 1, "layer2": 2, "layer3": 3}


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Trained-looking statistics: folding the init's (0, 1, 1, 0) would prove little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g) * 0.5 + 1)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)


def _pair(name: str, **kw):
    torch.manual_seed(0)
    plain = FeatureExtractor(name, STAGES, ["layer2", "layer3"], pretrained=False, frozen=True,
                             fuse_batchnorm=False, **kw)
    _randomise_bn(plain.model)
    fused = FeatureExtractor(name, STAGES, ["layer2", "layer3"], pretrained=False, frozen=True, **kw)
    fused.load_state_dict(plain.state_dict())
    return plain, fused


def test_folded_features_equal_the_batch_norm_ones_up_to_rounding():
    for name in ("resnet18", "tf_efficientnet_lite0"):  # plain BatchNorm2d; timm BatchNormAct2d + Conv2dSame
        plain, fused = _pair(name)
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            a, b = plain(x), fused(x)
        folded = fused._fused["model"]
        assert folded is not None, name
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()), name
        assert any(isinstance(m, nn.BatchNorm2d) for m in fused.model.modules())  # the module itself is untouched
        for k in a:
            scale = float(a[k].abs().max())
            assert float((a[k] - b[k]).abs().max()) <= 2e-5 * scale, (name, k)
        assert set(fused.state_dict()) == set(plain.state_dict())  # checkpoints keep their keys


def test_folding_follows_loaded_weights_and_is_off_with_gradients():
    plain, fused = _pair("resnet18")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = fused(x)["layer3"]
        other = FeatureExtractor("resnet18", STAGES, ["layer2", "layer3"], pretrained=False, frozen=True,
                                 fuse_batchnorm=False)
        _randomise_bn(other.model, seed=1)
        fused.load_state_dict(other.state_dict())  # in-place copies: the folded copy must be rebuilt
        after, want = fused(x)["layer3"], other(x)["layer3"]
    assert not torch.allclose(before, after)
    assert torch.allclose(after, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    with torch.enable_grad():  # gradients wanted: the model as trained, not the copy
        y = x.clone().requires_grad_(True)
        assert torch.equal(fused(y)["layer3"], other(y)["layer3"])


class _ConvUsedTwice(nn.Module):
    """A conv output read by its BN *and* by a residual: folding would change the residual."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_graph_folding_would_change_is_left_alone():
    m = _ConvUsedTwice().eval()
    _randomise_bn(m)
    fused, count = fold_batchnorm(m, torch.randn(1, 3, 16, 16))
    assert fused is None and count == 0


def test_a_trained_extractor_folds_in_eval_and_follows_each_optimiser_step():
    """STFPM's student: trained (not frozen), evaluated with folded batch norms; after every
    in-place optimiser step the folded copy is rebuilt, so evaluation sees the current weights."""
    torch.manual_seed(0)
    student = FeatureExtractor("resnet18", STAGES, ["layer2", "layer3"], pretrained=False, frozen=False)
    plain = FeatureExtractor("resnet18", STAGES, ["layer2", "layer3"], pretrained=False, frozen=False,
                             fuse_batchnorm=False)
    _randomise_bn(student.model)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    x = torch.randn(2, 3, 64, 64)
    for step in range(2):
        student.eval()
        plain.load_state_dict(student.state_dict())
        plain.eval()
        with torch.no_grad():
            got, want = student(x)["layer3"], plain(x)["layer3"]
        assert student._fused["model"] is not None, step  # folded, although trainable
        assert float((got - want).abs().max()) <= 2e-5 * float(want.abs().max()), step
        student.train()
        loss = sum(f.square().mean() for f in student(x).values())  # train mode: BN as trained
        opt.zero_grad()
        loss.backward()
        opt.step()
    before_key = student._fused["key"]
    student.eval()
    with torch.no_grad():
        student(x)
    assert student._fused["key"] != before_key  # the last step's weights: folded again
