"""A task of several categories reports each category's figures: equal to testing the same model on
that category alone."""

import pytest


def test_each_categorys_figures_equal_testing_the_model_on_it_alone(base_cfg, tmp_path):
    import adtrain
    from adtrain.data.testing import write_mvtec_tree
    from adtrain.run import run

    root = tmp_path / "mvtec"
    write_mvtec_tree(root, "c1", n_train=8, n_test_good=3, defects={"crack": 3}, size=48, seed=0)
    write_mvtec_tree(root, "c2", n_train=8, n_test_good=3, defects={"hole": 2, "scratch": 2}, size=48, seed=1)
    cfg = base_cfg("data=mvtec", f"data.root={root}", "data.category=[c1,c2]", "data.num_workers=0",
                   "method=patchcore", "method.center_crop=null", "method.image_size=[48,48]")
    res = run(cfg, tmp_path / "run")
    cats = res["by_category"]
    assert sorted(cats) == ["c1", "c2", "mean"]
    for cat in ("c1", "c2"):
        alone = adtrain.test(tmp_path / "run", [f"data.category={cat}"], out_dir=tmp_path / f"alone_{cat}")
        for key in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"):
            assert cats[cat][key] == pytest.approx(alone[key], abs=1e-12), (cat, key)
        decided = alone["test_at_threshold"]  # adtrain.test gives results.json's breakdown too
        assert alone["by_category"] is None and decided["tp"] + decided["fn"] == (3 if cat == "c1" else 4)
    assert cats["mean"]["pixel_aupro"] == pytest.approx((cats["c1"]["pixel_aupro"] + cats["c2"]["pixel_aupro"]) / 2)
    assert cats["c1"]["pixel_metrics_exact"] is True and cats["mean"]["pixel_metrics_exact"] is True
    assert sorted(res["image_auroc_by_defect"]) == ["c1/crack", "c2/hole", "c2/scratch"]


def test_ddp_recording_replays_each_images_category_into_its_accumulator():
    import torch

    from adtrain.distributed import RecordingEvaluator
    from adtrain.metrics import AnomalyEvaluator

    g = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 1, 8, 8, generator=g)
    masks = (torch.rand(6, 1, 8, 8, generator=g) > 0.8).float()
    labels = torch.tensor([0, 1, 1, 0, 1, 1])
    masks[labels == 0] = 0
    cats = ["a", "b", "a", "b", "b", "a"]
    plain = AnomalyEvaluator(pixel_groups=2)
    plain.update_pixels(maps, labels, masks, torch.ones(6, dtype=torch.bool), cats)
    rec = RecordingEvaluator(lambda: AnomalyEvaluator(pixel_groups=2))
    for idx in ([3, 4, 5], [0, 1, 2]):  # out of order, as ranks deliver them
        rec.next_index = torch.tensor(idx)
        rec.update_pixels(maps[idx], labels[idx], masks[idx], torch.ones(3, dtype=torch.bool), [cats[i] for i in idx])
    merged = rec.merged()
    assert merged.compute_groups() == plain.compute_groups() and sorted(plain.compute_groups()) == ["a", "b"]
    assert merged.compute() == plain.compute()
    assert AnomalyEvaluator().compute_groups() == {}


def test_a_streamed_category_reports_its_own_error_bounds():
    """Each category gets an even share of the exact-pixel budget, so a large one can stream while the
    pooled figures stay exact: its figures then come with their bounds (and the mean's)."""
    import torch

    from adtrain.metrics import AnomalyEvaluator
    from adtrain.metrics.image import by_category

    g = torch.Generator().manual_seed(1)
    maps = torch.rand(10, 1, 16, 16, generator=g)
    masks = (torch.rand(10, 1, 16, 16, generator=g) > 0.85).float()
    labels = torch.tensor([0, 1] * 5)
    masks[labels == 0] = 0
    cats = ["a"] * 8 + ["b"] * 2  # a: 2,048 pixels, b: 512; budget 2,560: pooled exact, a's share 1,280
    streamed = AnomalyEvaluator(pixel_groups=2, exact_pixels=2560, num_bins=16)
    exact = AnomalyEvaluator(pixel_groups=2, exact_pixels=10**6)
    for ev in (streamed, exact):
        ev.update_pixels(maps, labels, masks, torch.ones(10, dtype=torch.bool), cats)
    got, want = streamed.compute_groups(), exact.compute_groups()
    assert streamed.pixel.exact and not got["a"]["pixel_metrics_exact"] and got["b"]["pixel_metrics_exact"]
    assert set(got["b"]["pixel_error_bounds"].values()) == {0.0}
    bounds = got["a"]["pixel_error_bounds"]
    assert max(bounds.values()) > 0
    for key, bound in bounds.items():
        assert abs(got["a"][key] - want["a"][key]) <= bound + 1e-12, key
    assert any(got["a"][k] != want["a"][k] for k in bounds)  # it did stream
    records = [{"category": c, "score": float(i), "label": int(lab)} for i, (c, lab) in enumerate(zip(cats, labels))]
    mean = by_category(records, got)["mean"]
    assert mean["pixel_metrics_exact"] is False
    assert mean["pixel_error_bounds"] == {k: v / 2 for k, v in bounds.items()}


def test_aupro_fpr_limit_is_a_setting_of_the_run_and_of_a_later_test(fast_cfg, tmp_path):
    import adtrain
    from adtrain.errors import ConfigError
    from adtrain.run import run

    res = run(fast_cfg("method=patchcore", "metrics.aupro_fpr_limit=0.05"), tmp_path / "run")
    assert res["pixel_aupro_fpr_limit"] == 0.05
    wider = adtrain.test(tmp_path / "run", ["metrics.aupro_fpr_limit=0.3"])
    same = adtrain.test(tmp_path / "run")
    assert same["pixel_aupro"] == pytest.approx(res["pixel_aupro"], abs=1e-12)
    assert (same["pixel_aupro_fpr_limit"], wider["pixel_aupro_fpr_limit"]) == (0.05, 0.3)  # which figure it is
    assert wider["pixel_aupro"] != pytest.approx(res["pixel_aupro"], abs=1e-6)  # another integration range
    assert wider["pixel_auroc"] == pytest.approx(res["pixel_auroc"], abs=1e-12)  # nothing else moves
    with pytest.raises(ConfigError, match="metrics.aupro_fpr_limit"):
        run(fast_cfg("method=patchcore", "metrics.aupro_fpr_limit=0"), tmp_path / "bad")
