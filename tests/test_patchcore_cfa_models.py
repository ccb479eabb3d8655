"""PatchCore and CFA torch models on tiny random-init backbones (no downloaded weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adtrain.errors import ConfigError
from adtrain.methods.cfa import CfaModel
from adtrain.methods.cfa.torch_model import CoordConv1x1
from adtrain.methods.output import AnomalyOutput
from adtrain.methods.patchcore import PatchcoreModel
from adtrain.methods.patch_features import gaussian_blur2d

import faiss  # noqa: E402,F401 - a hard dependency: an import error must fail, not skip


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


RESNET18 = {"name": "resnet18", "stages": {"layer1": 1, "layer2": 2, "layer3": 3}, "pretrained": False}


class StubExtractor(nn.Module):
    """Conv pyramid with batch norm: layer1..3 at stride 4, 8, 16."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 4, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.l2 = nn.Sequential(nn.Conv2d(8, 12, 3, 2, 1), nn.ReLU())
        self.l3 = nn.Sequential(nn.Conv2d(12, 16, 3, 2, 1), nn.ReLU())
        self.channels = {"layer1": 8, "layer2": 12, "layer3": 16}

    def forward(self, x):
        f1 = self.stem(x)
        f2 = self.l2(f1)
        return {"layer1": f1, "layer2": f2, "layer3": self.l3(f2)}


def _normal(n, seed, size=64):
    """Smooth random textures: upsampled low-resolution noise."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=size, mode="bilinear") * 0.5


def _with_patch(x):
    x = x.clone()
    x[:, :, 20:36, 24:40] = 3.0
    return x


@pytest.fixture(scope="module")
def patchcore():
    torch.manual_seed(0)
    model = PatchcoreModel(RESNET18, coreset_ratio=0.25, memory={"backend": "faiss"})
    for seed in range(3):
        model.add_batch(_normal(6, seed))
    model.build()
    return model.eval()


def test_patchcore_embedding_and_memory(patchcore):
    emb = patchcore.embed(_normal(2, 9))
    assert emb.shape == (2, 128 + 256, 8, 8)  # resnet18 layer2 + layer3 on layer2's grid
    assert len(patchcore.memory) == int(3 * 6 * 64 * 0.25)


def test_patchcore_scores_pasted_patch_higher(patchcore):
    x = _normal(4, 100)
    normal, anomalous = patchcore(x), patchcore(_with_patch(x))
    assert isinstance(normal, AnomalyOutput)
    assert normal.anomaly_map.shape == (4, 1, 64, 64) and normal.pred_score.shape == (4,)
    assert (anomalous.pred_score > normal.pred_score.max()).all()
    amap = anomalous.anomaly_map[:, 0]
    inside = amap[:, 20:36, 24:40].mean()
    outside = torch.cat([amap[:, :12].flatten(), amap[:, 44:].flatten()]).mean()
    assert inside > 2 * outside


def test_patchcore_reweighting(patchcore):
    x = _with_patch(_normal(3, 101))
    emb = patchcore.embed(x)
    dist, index = patchcore.patch_distances(emb)
    max_d, pos = dist.flatten(1).max(dim=1)
    rows = torch.arange(3)
    query = emb.flatten(2)[rows, :, pos]
    w = patchcore.reweight(query, max_d, index.flatten(1)[rows, pos])
    assert ((w > 0) & (w <= 1)).all()
    bank = patchcore.memory.bank  # brute force: softmax over ||q - m_b||, m_b the 9 nearest of m*
    m_star = bank[index.flatten(1)[rows, pos]]
    support = torch.cdist(m_star, bank, compute_mode="donot_use_mm_for_euclid_dist").topk(9, largest=False)
    d_support = (query.unsqueeze(1) - bank[support.indices]).norm(dim=-1)
    expected = 1 - torch.exp(max_d) / torch.exp(d_support).sum(dim=1)
    torch.testing.assert_close(w, expected, atol=1e-5, rtol=1e-5)
    assert (w >= 1 - 1 / patchcore.num_neighbors - 1e-6).all()  # m* is the nearest of its neighbours
    torch.testing.assert_close(patchcore.image_score(emb, dist, index), w * max_d)
    # num_neighbors = 1: no reweighting, the score is the max patch distance
    patchcore.num_neighbors = 1
    try:
        torch.testing.assert_close(patchcore(x).pred_score, max_d)
    finally:
        patchcore.num_neighbors = 9


def test_patchcore_squared_scores_are_the_official_codes_squared_distances(patchcore):
    """method.squared_scores (the official code's FAISS IndexFlatL2 scores): the map is the blurred
    map of the squared patch distances, the image score the square of the plain one."""
    x = _with_patch(_normal(2, 104))
    plain = patchcore(x)
    dist, _ = patchcore.patch_distances(patchcore.embed(x))
    patchcore.squared_scores = True
    try:
        squared = patchcore(x)
    finally:
        patchcore.squared_scores = False
    torch.testing.assert_close(squared.pred_score, plain.pred_score.square())
    torch.testing.assert_close(squared.anomaly_map, patchcore.anomaly_map(dist.square(), x.shape[-2:]))
    assert not torch.allclose(squared.anomaly_map, plain.anomaly_map.square(), rtol=1e-3)  # blurred after squaring
    with pytest.raises(ConfigError, match="squared_scores"):
        PatchcoreModel(RESNET18, squared_scores="yes")


def test_patchcore_patch_distances_are_nearest_neighbours(patchcore):
    emb = patchcore.embed(_normal(1, 102))
    dist, index = patchcore.patch_distances(emb)
    flat = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
    brute = torch.cdist(flat, patchcore.memory.bank, compute_mode="donot_use_mm_for_euclid_dist")
    torch.testing.assert_close(dist.flatten(), brute.min(dim=1).values, atol=1e-4, rtol=1e-5)


def test_patchcore_state_dict_round_trip(patchcore):
    x = _with_patch(_normal(2, 103))
    fresh = PatchcoreModel(RESNET18, memory={"backend": "torch"}).eval()
    fresh.load_state_dict(patchcore.state_dict())
    torch.testing.assert_close(fresh(x).pred_score, patchcore(x).pred_score)


def test_patchcore_stub_extractor_and_config_errors():
    model = PatchcoreModel(extractor=StubExtractor(), layers=("layer2", "layer3"), coreset_ratio=0.5)
    model.train()
    assert not model.extractor.training  # frozen extractor stays in eval mode
    model.add_batch(_normal(2, 1))
    model.build()
    assert model.memory.bank.shape == (64, 28)
    out = model.eval()(_normal(1, 2))
    assert out.anomaly_map.shape == (1, 1, 64, 64)
    with pytest.raises(ConfigError, match="coreset_ratio"):
        PatchcoreModel(extractor=StubExtractor(), coreset_ratio=0)
    with pytest.raises(ConfigError, match="backbone"):
        PatchcoreModel()


def test_gaussian_blur_preserves_mass_and_smooths():
    x = torch.zeros(1, 1, 40, 40)
    x[0, 0, 20, 20] = 1.0
    y = gaussian_blur2d(x, 4.0)
    assert y.shape == x.shape
    assert abs(y.sum().item() - 1.0) < 1e-5
    assert y.max().item() < 0.02 and y[0, 0, 20, 20] == y.max()
    tiny = gaussian_blur2d(torch.rand(2, 1, 8, 8), 4.0)  # smaller than the kernel radius
    assert tiny.shape == (2, 1, 8, 8) and torch.isfinite(tiny).all()


def test_gaussian_blur_is_scipys_gaussian_filter_in_both_border_modes():
    """The official PatchCore and CFA code blur with ``scipy.ndimage.gaussian_filter(sigma=4)``,
    whose default border is ``reflect`` (d c b a | a b c d): the default here. ``mirror``
    (d c b | a b c d) is anomalib's (kornia's "reflect"). Both equal scipy's at any map size,
    including maps narrower than the kernel's radius, and through the two-product map."""
    from scipy import ndimage

    from adtrain.methods.patch_features import upsampled_map

    g = torch.Generator().manual_seed(3)
    for shape, sigma in [((40, 40), 4.0), ((9, 23), 4.0), ((1, 5), 2.0), ((224, 224), 4.0), ((6, 6), 1.5)]:
        x = torch.rand(2, 1, *shape, generator=g, dtype=torch.float64).float()
        for mode in ("reflect", "mirror"):
            want = np.stack([ndimage.gaussian_filter(x[i, 0].double().numpy(), sigma, mode=mode) for i in range(2)])
            got = gaussian_blur2d(x, sigma, mode)[:, 0].double().numpy()
            assert np.allclose(got, want, atol=1e-6), (shape, mode)
    s = torch.rand(2, 1, 28, 28, generator=g) * 30
    up = torch.nn.functional.interpolate(s, size=(224, 224), mode="bilinear", align_corners=False)
    for mode in ("reflect", "mirror"):
        want = np.stack([ndimage.gaussian_filter(up[i, 0].double().numpy(), 4.0, mode=mode) for i in range(2)])
        assert np.allclose(upsampled_map(s, (224, 224), 4.0, mode)[:, 0].double().numpy(), want, atol=1e-4)
    edge = upsampled_map(s, (224, 224), 4.0, "reflect") - upsampled_map(s, (224, 224), 4.0, "mirror")
    assert float(edge[..., 20:-20, 20:-20].abs().max()) < 1e-4 < float(edge.abs().max())  # the borders differ
    with pytest.raises(ConfigError, match="method.blur_mode"):
        gaussian_blur2d(x, 4.0, "wrap")
    with pytest.raises(ConfigError, match="method.blur_mode"):
        PatchcoreModel(extractor=StubExtractor(), blur_mode="nearest")


def test_upsampled_map_is_the_resized_blurred_map_as_two_matrix_products():
    """PatchCore's, CFA's and DFM's maps: upsampled_map equals interpolate (bilinear) then
    gaussian_blur2d to float rounding, for square, oblong, smaller-than-the-kernel and unblurred
    maps; fp32 under a bf16 autocast; gradients reach the patch scores."""
    import torch.nn.functional as F

    from adtrain.methods.patch_features import upsampled_map

    g = torch.Generator().manual_seed(1)
    for grid, size, sigma in [((32, 32), (256, 256), 4.0), ((28, 28), (224, 224), 4.0), ((7, 9), (70, 90), 2.0),
                              ((4, 4), (8, 8), 4.0), ((8, 8), (64, 64), 0.0), ((16, 16), (16, 16), 4.0)]:
        s = torch.rand(3, 1, *grid, generator=g) * 30
        want = gaussian_blur2d(F.interpolate(s, size=size, mode="bilinear", align_corners=False), sigma)
        got = upsampled_map(s, size, sigma)
        assert got.shape == want.shape == (3, 1, *size) and got.dtype == torch.float32
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * 30), (grid, size, sigma)
        assert torch.equal(upsampled_map(s[:, 0], size, sigma), got)  # (B, h, w) alike
    s = (torch.rand(2, 1, 32, 32, generator=g) * 30).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = upsampled_map(s, (256, 256), 4.0)
    assert low.dtype == torch.float32 and torch.equal(low, upsampled_map(s, (256, 256), 4.0))
    low.sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and float(s.grad.abs().sum()) > 0


def test_coordconv_channels():
    conv = CoordConv1x1(3, 4)
    with torch.no_grad():
        conv.conv.weight.zero_()
        conv.conv.bias.zero_()
        conv.conv.weight[0, 3] = 1.0  # row coordinate
        conv.conv.weight[1, 4] = 1.0  # column coordinate
    out = conv(torch.zeros(2, 3, 5, 7))
    assert out.shape == (2, 4, 5, 7)
    rows = torch.linspace(-1, 1, 5).view(5, 1).expand(5, 7)
    cols = torch.linspace(-1, 1, 7).view(1, 7).expand(5, 7)
    torch.testing.assert_close(out[1, 0], rows)  # varies along the height only
    torch.testing.assert_close(out[1, 1], cols)  # varies along the width only
    assert out[0, 0, 0, 0] == -1 and out[0, 0, -1, 0] == 1 and out[0, 1, 0, -1] == 1


def _cfa(**kwargs):
    torch.manual_seed(0)
    model = CfaModel(extractor=StubExtractor(), memory={"backend": "faiss"}, **kwargs)
    model.init_memory([_normal(4, s) for s in range(3)])
    return model


def test_cfa_memory_is_the_mean_descriptor_map():
    model = _cfa()
    assert model.memory.bank.shape == (16 * 16, 36)  # layer1 grid of 64x64, 8+12+16 channels
    with torch.no_grad():
        means = [model.descriptors(_normal(4, s)).mean(0) for s in range(3)]
    expected = torch.stack(means).mean(0).flatten(1).t()
    torch.testing.assert_close(model.memory.bank, expected)
    compressed = _cfa(gamma_c=4, gamma_d=2)
    assert compressed.memory.bank.shape == (64, 18)


def test_cfa_loss_decreases_and_gradients():
    model = _cfa()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                            weight_decay=5e-4, amsgrad=True)
    x = _normal(4, 7)
    losses = []
    for _ in range(15):
        out = model.loss(x)
        assert set(out) == {"loss", "att", "rep"}
        opt.zero_grad()
        out["loss"].backward()
        if not losses:
            assert model.descriptor.conv.weight.grad is not None
            assert model.descriptor.conv.weight.grad.abs().sum() > 0
            assert model.radius.grad is not None
            assert all(p.grad is None and not p.requires_grad for p in model.extractor.parameters())
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.7 * losses[0]
    assert torch.isfinite(torch.tensor(losses)).all()


def test_cfa_loss_matches_bruteforce_definition():
    model = _cfa(learn_radius=False, radius=0.5)
    x = _normal(2, 8)
    out = model.loss(x)
    phi = model.descriptors(x).permute(0, 2, 3, 1).reshape(-1, 36)
    d2 = torch.cdist(phi, model.memory.bank, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    d2 = d2.topk(6, largest=False).values
    att = F.relu(d2[:, :3] - 0.25).mean() / 1e-3
    rep = F.relu(0.25 - d2[:, 3:] - 0.1).mean() / 1e-3
    torch.testing.assert_close(out["att"], att, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["rep"], rep, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("learn", [True, False])
def test_cfa_radius_is_a_parameter_iff_learned(learn):
    model = CfaModel(extractor=StubExtractor(), learn_radius=learn)
    names = dict(model.named_parameters())
    assert ("radius" in names) == learn
    assert "radius" in model.state_dict()
    assert model.radius.item() == pytest.approx(1e-5)


def test_cfa_scores_and_real_backbone():
    model = CfaModel(RESNET18, memory={"backend": "torch"})
    assert all(not p.requires_grad for p in model.extractor.parameters())
    model.init_memory([{"image": _normal(4, s)} for s in range(2)])
    assert model.memory.bank.shape == (16 * 16, 64 + 128 + 256)
    model.eval()
    x = _normal(3, 9)
    normal, anomalous = model(x), model(_with_patch(x))
    assert normal.anomaly_map.shape == (3, 1, 64, 64)
    torch.testing.assert_close(normal.pred_score, normal.anomaly_map.flatten(1).amax(1))
    assert (anomalous.pred_score > normal.pred_score.max()).all()
    phi = model.descriptors(x).permute(0, 2, 3, 1).reshape(-1, 448)
    d = torch.cdist(phi, model.memory.bank, compute_mode="donot_use_mm_for_euclid_dist")
    d = d.topk(3, largest=False).values
    expected = (F.softmin(d, dim=-1)[:, 0] * d[:, 0]).reshape(3, 1, 16, 16)
    torch.testing.assert_close(model.score_map(x), expected, atol=1e-4, rtol=1e-4)
