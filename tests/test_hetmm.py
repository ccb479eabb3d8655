"""HETMM: ATMM against a loop reference, PTS selection, the model's template handling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adtrain.errors import ConfigError
from adtrain.methods.hetmm import (
    HetmmModel,
    atmm_backward,
    atmm_forward,
    atmm_mutual,
    atmm_naive,
    load_category_params,
    optics_labels,
    pts_select,
)
from adtrain.methods.hetmm.pts import _cosine_dist

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CATEGORIES = Path(__file__).resolve().parents[1] / "src" / "adtrain" / "methods" / "hetmm" / "hetmm_categories.yaml"


def unit(*shape, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=1).to(device)


# ----------------------------------------------------------------------------- ATMM
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [1, 3, 5, 7])
@pytest.mark.parametrize("chunk", [1, 2, 64])
def test_atmm_matches_loop_reference(window, chunk, device):
    q, t = unit(2, 4, 5, 6, seed=1), unit(5, 4, 5, 6, seed=2)
    ref_f = atmm_naive(q, t, window, "forward")
    ref_b = atmm_naive(q, t, window, "backward")
    got_f = atmm_forward(q.to(device), t.to(device), window, chunk_size=chunk).cpu()
    got_b = atmm_backward(q.to(device), t.to(device), window, chunk_size=chunk).cpu()
    assert got_f.dtype == torch.float32 and got_f.shape == (2, 5, 6)
    torch.testing.assert_close(got_f, ref_f, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_b, ref_b, atol=1e-5, rtol=0)
    # the two directions differ in general (else the test data would be degenerate)
    if window > 1:
        assert (ref_f - ref_b).abs().max() > 1e-3


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_atmm_mutual_one_pass_equals_separate_calls(rows):
    q, t = unit(3, 8, 6, 6, seed=3), unit(4, 8, 6, 6, seed=4)
    s_f, s_b = atmm_mutual(q, t, 5, 3, chunk_size=3, rows_per_bmm=rows)  # offset groups of 1, 2, 21
    torch.testing.assert_close(s_f, atmm_naive(q, t, 5, "forward"), atol=1e-5, rtol=0)
    torch.testing.assert_close(s_b, atmm_naive(q, t, 3, "backward"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_atmm_low_precision_close_to_fp32(dtype):
    q, t = unit(2, 32, 6, 6, seed=5), unit(6, 32, 6, 6, seed=6)
    ref = atmm_mutual(q, t, 3, 3)
    low = atmm_mutual(q.to(dtype), t.to(dtype), 3, 3)
    for a, b in zip(low, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=3e-2, rtol=0)


def test_identical_query_scores_zero_both_directions():
    t = unit(4, 16, 6, 7, seed=7)
    s_f, s_b = atmm_mutual(t[2:3], t, 3, 3)
    assert s_f.abs().max() < 1e-5 and s_b.abs().max() < 1e-5


def test_one_pixel_shift_absorbed_by_window_3_not_by_window_1():
    t = unit(1, 16, 8, 8, seed=8)
    q = unit(1, 16, 8, 8, seed=9)
    q[..., :-1] = t[..., 1:]  # q(i, j) = t(i, j + 1)
    inner = (slice(None), slice(1, -1), slice(1, -1))
    for direction, fn in (("forward", atmm_forward), ("backward", atmm_backward)):
        w3 = fn(q, t, 3)[inner]
        w1 = fn(q, t, 1)[inner]
        assert w3.abs().max() < 1e-5, direction
        assert w1.min() > 0.2, direction  # random 16-d unit vectors: cos well below 0.8


def test_positions_off_the_grid_are_skipped_not_zero_padded():
    v = unit(1, 8, 1, 1, seed=20).expand(1, 8, 4, 5)
    s_f, s_b = atmm_mutual(-v, v.expand(2, 8, 4, 5), 3, 3)  # every dot product is -1
    torch.testing.assert_close(s_f, torch.full_like(s_f, 2.0))
    torch.testing.assert_close(s_b, torch.full_like(s_b, 2.0))


def test_atmm_rejects_even_window_and_bad_shapes():
    q, t = unit(1, 4, 4, 4), unit(2, 4, 4, 4)
    with pytest.raises(ConfigError):
        atmm_forward(q, t, 4)
    with pytest.raises(ValueError):
        atmm_forward(q, unit(2, 4, 5, 4), 3)


# ----------------------------------------------------------------------------- PTS
def clustered(n_per, k, c, h, w, spread=0.05, seed=0):
    """k well-separated (orthogonal) clusters of n_per unit vectors at every position."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.zeros(k, c, h, w)
    for i in range(k):
        centers[i, i] = 1.0
    x = centers.repeat_interleave(n_per, dim=0) + spread * torch.randn(k * n_per, c, h, w, generator=g)
    perm = torch.randperm(k * n_per, generator=g)
    return F.normalize(x[perm], dim=1)


def test_pts_shape_and_guard():
    t = unit(12, 6, 3, 4, seed=10)
    res = pts_select(t, 5)
    assert res.templates.shape == (5, 6, 3, 4) and res.indices.shape == (5, 3, 4)
    # every kept vector is the template it points at, and the K per position are distinct
    for i in range(3):
        for j in range(4):
            idx = res.indices[:, i, j]
            assert len(set(idx.tolist())) == 5
            torch.testing.assert_close(res.templates[:, :, i, j], t[idx, :, i, j])
    small = pts_select(t[:4], 5)
    assert small.templates.shape == (4, 6, 3, 4)
    torch.testing.assert_close(small.templates, t[:4])
    with pytest.raises(ConfigError):
        pts_select(t, 0)


def test_pts_easy_normals_are_cluster_medoids():
    k = 3
    t = clustered(10, k, 8, 2, 3, seed=11)
    res = pts_select(t, k)
    assert (res.n_easy == k).all()
    for i in range(2):
        for j in range(3):
            x = t[:, :, i, j]
            dist = 1 - x @ x.T
            owner = x.argmax(dim=1)  # which orthogonal center a vector belongs to
            expected = set()
            for c in range(k):
                members = (owner == c).nonzero().flatten()
                expected.add(members[dist[members][:, members].sum(1).argmin()].item())
            assert set(res.indices[:, i, j].tolist()) == expected


def test_optics_fast_backend_equals_sklearn():
    t = torch.cat([clustered(8, 3, 6, 2, 2, spread=0.3, seed=12), unit(6, 6, 2, 2, seed=13)])
    x = t.permute(2, 3, 0, 1).reshape(4, 30, 6).double()
    dist = (1 - x @ x.transpose(1, 2)).clamp_min(0)
    dist.diagonal(dim1=1, dim2=2).zero_()
    for ms in (2, 4):
        fast = optics_labels(dist, ms, "torch")
        ref = optics_labels(dist, ms, "sklearn")
        assert torch.equal(fast, ref)
    assert fast.max() >= 1  # found clusters: the comparison is not trivially all-noise


def reference_selection(dist: torch.Tensor, labels: torch.Tensor, k: int) -> list[int]:
    """Plain-Python PTS selection at one position from its (N,N) cosine distances."""
    sim = (1 - dist).tolist()
    n = len(sim)
    clusters = {}
    for i, lab in enumerate(labels.tolist()):
        if lab >= 0:
            clusters.setdefault(lab, []).append(i)
    ranked = sorted(clusters.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:k]
    chosen = [min(m, key=lambda i: (sum(1 - sim[i][j] for j in m), i)) for _, m in ranked]
    if not chosen:
        chosen = [min(range(n), key=lambda i: (sum(1 - sim[i][j] for j in range(n)), i))]
    while len(chosen) < k:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(min(rest, key=lambda i: (sum(sim[i][j] for j in chosen), i)))
    return chosen


def test_pts_hard_normals_match_reference():
    t = torch.cat([clustered(6, 2, 8, 2, 2, spread=0.2, seed=14), unit(12, 8, 2, 2, seed=15)])
    k = 9
    res = pts_select(t, k)
    dist = _cosine_dist(t.permute(2, 3, 0, 1).reshape(4, 24, 8).contiguous())
    labels = optics_labels(dist, max(2, 24 // k))
    for p in range(4):
        expected = reference_selection(dist[p], labels[p], k)
        assert set(res.indices[:, p // 2, p % 2].tolist()) == set(expected)
        assert 0 < res.n_easy[p // 2, p % 2] < k  # both easy and hard normals were chosen


def test_tiny_set_scores_close_to_full_set():
    t = clustered(12, 4, 16, 4, 4, spread=0.08, seed=16)  # N = 48
    q = clustered(1, 4, 16, 4, 4, spread=0.08, seed=17)  # 4 new normals, one per mode
    tiny = pts_select(t, 8).templates
    full_f, full_b = atmm_mutual(q, t, 3, 3)
    tiny_f, tiny_b = atmm_mutual(q, tiny, 3, 3)
    for full, small in ((full_f, tiny_f), (full_b, tiny_b)):
        assert (small >= full - 1e-6).all()  # a subset can only match worse
        # stated tolerance (cosine units): max 0.06, mean 0.015; normals score ~0.03 here.
        # Every mode keeps a medoid, so no query falls off (a random 8-subset can miss one).
        assert (small - full).max() < 0.06 and (small - full).mean() < 0.015
    # far from all normals: far above that tolerance
    assert atmm_mutual(unit(1, 16, 4, 4, seed=18), tiny, 3, 3)[0].min() > 0.3


def test_per_image_mode_keeps_same_sheets_everywhere():
    t = clustered(8, 3, 8, 3, 3, seed=19)
    res = pts_select(t, 4, pts_positions="per_image")
    assert res.templates.shape == (4, 8, 3, 3)
    assert (res.indices == res.indices[:, :1, :1]).all()


# ----------------------------------------------------------------------------- model
class StubExtractor(nn.Module):
    """Fixed random convs: layer1 stride 4, layer2 stride 8, layer3 stride 16."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 4, stride=4)
        self.c2 = nn.Conv2d(8, 12, 2, stride=2)
        self.c3 = nn.Conv2d(12, 16, 2, stride=2)

    def forward(self, x):
        f1 = torch.tanh(self.c1(x))
        f2 = torch.tanh(self.c2(f1))
        return {"layer1": f1, "layer2": f2, "layer3": torch.tanh(self.c3(f2))}


def make_model(**kw):
    args = dict(forward_windows=(3, 3, 1), backward_windows=(3, 1, 1), extractor=StubExtractor())
    args.update(kw)
    return HetmmModel(**args).eval()


def images(n, seed):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("device", DEVICES)
def test_model_output_and_hot_update(device):
    model = make_model().to(device)
    with pytest.raises(Exception, match="no templates"):
        model(images(1, 0).to(device))
    model.add_templates(images(3, 1).to(device))
    new = images(1, 2).to(device)
    out = model(new)
    assert out.anomaly_map.shape == (1, 1, 32, 32) and out.pred_score.shape == (1,)
    assert torch.allclose(out.pred_score, out.anomaly_map.flatten(1).amax(1))
    assert out.pred_score.item() > 0.05
    model.add_templates(new)  # hot update
    assert model.num_templates == 4
    assert model(new).anomaly_map.abs().max().item() < 1e-5


def test_model_fp16_storage():
    model = make_model(template_dtype="float16")
    model.add_templates(images(2, 3))
    assert model.template_set("layer1").dtype == torch.float16
    assert model(images(1, 3)).anomaly_map.abs().max() < 1e-2


def test_state_dict_round_trip_with_different_n():
    src = make_model()
    src.add_templates(images(3, 4))
    src.compress(2)
    dst = make_model()
    dst.add_templates(images(5, 5))
    dst.load_state_dict(src.state_dict())
    assert dst.num_templates == 2 and bool(dst.compressed)
    x = images(2, 6)
    torch.testing.assert_close(dst(x).anomaly_map, src(x).anomaly_map)
    empty = make_model()
    empty.load_state_dict(src.state_dict())
    assert empty.template_set("layer3").shape == src.template_set("layer3").shape


def test_compress_keeps_k_and_model_validates_config():
    model = make_model(templates=3)
    model.add_templates(images(6, 7))
    model.compress()
    assert model.num_templates == 3 and bool(model.compressed)
    with pytest.raises(ConfigError, match="forward_windows"):
        make_model(forward_windows=(4, 3, 1))
    with pytest.raises(ConfigError, match="alphas"):
        make_model(alphas=(0.5, 0.5))
    with pytest.raises(ConfigError, match="templates"):
        make_model(templates="some")


def test_category_params_from_official_table():
    params = load_category_params(CATEGORIES, "cable")
    assert params == {
        "forward_windows": [13, 5, 7], "backward_windows": [7, 5, 1],
        "alphas": [0.7, 0.7, 0.3], "lambdas": [1.0, 0.8, 0.8],
    }
    assert load_category_params(CATEGORIES, "not_a_category") == {}
    model = make_model()
    model.set_match_params(**params)
    assert model.forward_windows == [13, 5, 7] and model.lambdas == [1.0, 0.8, 0.8]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fw, bw", [(5, 3), (3, 5), (7, 1), (1, 7)])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_atmm_mutual_windows_and_offset_groups_match_loop(fw, bw, rows, device):
    """Both directions in one pass, windows of different sizes, offset groups of any size
    (a group may straddle the smaller window's offsets)."""
    q, t = unit(3, 4, 6, 5, seed=3), unit(4, 4, 6, 5, seed=4)
    s_f, s_b = atmm_mutual(q.to(device), t.to(device), fw, bw, chunk_size=2, rows_per_bmm=rows)
    torch.testing.assert_close(s_f.cpu(), atmm_naive(q, t, fw, "forward"), atol=1e-5, rtol=0)
    torch.testing.assert_close(s_b.cpu(), atmm_naive(q, t, bw, "backward"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk, rows", [(2, 5), (3, 64), (64, 7)])
def test_atmm_reused_buffers_give_the_fresh_tensors_results_bit_for_bit(chunk, rows):
    """Without gradients atmm_mutual writes its stacked offsets and products into two buffers
    made once per call (and keeps one image chunk's padded copy across template chunks); with
    gradients it makes fresh tensors. Both paths, over several image and template chunks and
    offset groups of uneven size, give the same bits (and the loop reference's values)."""
    q, t = unit(5, 6, 7, 6, seed=5), unit(7, 6, 7, 6, seed=6)
    with torch.no_grad():
        reused = atmm_mutual(q, t, 5, 3, chunk_size=chunk, rows_per_bmm=rows)
    fresh = atmm_mutual(q.clone().requires_grad_(), t, 5, 3, chunk_size=chunk, rows_per_bmm=rows)
    assert fresh[0].requires_grad  # the fresh path ran (out= tensors cannot carry gradients)
    for a, b in zip(reused, fresh):
        assert torch.equal(a, b.detach())
    torch.testing.assert_close(reused[0], atmm_naive(q, t, 5, "forward"), atol=1e-5, rtol=0)
    torch.testing.assert_close(reused[1], atmm_naive(q, t, 3, "backward"), atol=1e-5, rtol=0)


def test_a_traced_atmm_scores_every_image_of_a_larger_batch():
    """Traced for export, the image batch is not cut into chunk_size slices: a slice's bounds
    would be baked into the graph, and a batch larger than the traced one lost its images past
    them (a 70-image batch scored 64)."""
    q, t = unit(3, 6, 7, 6, seed=7), unit(4, 6, 7, 6, seed=8)

    def f(x):
        return atmm_mutual(x, t, 5, 3, chunk_size=2)

    traced = torch.jit.trace(f, (q,), check_trace=False)
    big = unit(5, 6, 7, 6, seed=9)
    got, want = traced(big), f(big)
    assert got[0].shape[0] == got[1].shape[0] == 5
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- feature tap
RESNET18 = {"name": "resnet18", "pretrained": False, "stages": {"layer1": 1, "layer2": 2, "layer3": 3},
            "timm_kwargs": {"zero_init_last": False}}  # timm's zero-init last BN: pre-ReLU values >= 0


@pytest.mark.parametrize("tap", ["pre_relu", "post_relu"])
def test_feature_tap_builds_the_extractor_and_scores(tap):
    torch.manual_seed(0)
    model = HetmmModel(RESNET18, forward_windows=(3, 3, 1), backward_windows=(3, 1, 1), feature_tap=tap).eval()
    assert model.feature_tap == tap and model.extractor.pre_activation == (tap == "pre_relu")
    raw = model.extractor(images(2, 8))
    assert all(bool((f < 0).any()) == (tap == "pre_relu") for f in raw.values())
    model.add_templates(images(3, 9))
    out = model(images(2, 10))
    assert out.anomaly_map.shape == (2, 1, 32, 32) and torch.isfinite(out.anomaly_map).all()
    assert model(images(3, 9)[:1]).pred_score.abs().item() < 1e-4  # a template scores ~0
    with pytest.raises(ConfigError, match="method.feature_tap"):
        HetmmModel(RESNET18, feature_tap="pre")


def test_checkpoint_keeps_its_tap_and_old_ones_are_post_relu():
    from adtrain.methods.hetmm import Hetmm

    torch.manual_seed(0)
    src = Hetmm(RESNET18, category_params=None, feature_tap="post_relu")
    src.model.add_templates(images(2, 11))
    state = src.state_dict()
    assert state["_extra_state"]["feature_tap"] == "post_relu"
    dst = Hetmm(RESNET18, category_params=None)  # the default, pre_relu: the stored templates win
    assert dst.model.extractor.pre_activation
    dst.load_state_dict(state)
    assert dst.model.feature_tap == "post_relu" and not dst.model.extractor.pre_activation
    x = images(1, 12)
    torch.testing.assert_close(dst.eval().model(x).anomaly_map, src.eval().model(x).anomaly_map, rtol=0, atol=0)
    del state["_extra_state"]["feature_tap"]  # written before the option: post-ReLU templates
    old = Hetmm(RESNET18, category_params=None, feature_tap="pre_relu")
    old.load_state_dict(state)
    assert old.model.feature_tap == "post_relu"
