"""HETMM end to end: training-free fit, tiny set, per-category values, hot update CLI/API."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image


def _score(checkpoint, image_dir):
    from adtrain.predict import predict

    out = predict(str(checkpoint), str(image_dir), out=str(image_dir.parent / f"pred_{checkpoint.stem}"), heatmaps=False)
    import csv

    return [float(r["score"]) for r in csv.DictReader(open(out / "predictions.csv"))]


def test_hetmm_run_and_hot_update(fast_cfg, tmp_path):
    from adtrain.build import build_datamodule
    from adtrain.loading import load_method
    from adtrain.run import run

    cfg = fast_cfg("method=hetmm", "method.batch_size=8")
    res = run(cfg, tmp_path / "run")
    # training-free matching ranks the synthetic defects (constant or noise maps give ~0.5)
    assert res["method"] == "hetmm" and res["image_auroc"] > 0.75 and res["pixel_auroc"] > 0.55
    ckpt = tmp_path / "run" / "checkpoints" / "model.ckpt"
    method, _, _ = load_method(ckpt)
    n_before = method.model.num_templates
    assert n_before == res["num_train"]
    assert method.model.feature_tap == "pre_relu" and method.model.extractor.pre_activation  # the default

    # an anomalous test image, added as a "normal" template, then scores ~0
    dm = build_datamodule(cfg)
    sample = next(s for s in dm.test_samples if s.label == 1)
    image, _ = dm.sample_loader()(sample)
    img_dir = tmp_path / "new_normals"
    img_dir.mkdir()
    Image.fromarray(image).save(img_dir / "a.png")
    before = _score(ckpt, img_dir)[0]
    p = subprocess.run([sys.executable, "-m", "adtrain.templates", "add", f"checkpoint={ckpt}",
                        f"images={img_dir}", f"out={tmp_path / 'updated.ckpt'}"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    updated, _, _ = load_method(tmp_path / "updated.ckpt")
    assert updated.model.num_templates == n_before + 1
    after = _score(tmp_path / "updated.ckpt", img_dir)[0]
    assert after < 1e-3 < before
    assert "{'before'" not in p.stdout  # the log line says it, no raw dict
    assert "the threshold" in p.stderr and "fit the run again" in p.stderr  # kept, and said
    # the same image again (and a copy of it) is skipped and said: templates are not duplicated
    from adtrain.templates import add_images

    (img_dir / "copy.png").write_bytes((img_dir / "a.png").read_bytes())
    again = add_images(str(tmp_path / "updated.ckpt"), str(img_dir))
    assert (again["added_images"], again["skipped_images"], again["after"]) == (0, 2, n_before + 1)
    assert load_method(tmp_path / "updated.ckpt")[0].model.num_templates == n_before + 1
    # out= a folder or where no folder can be made, recompress not a flag: one line, before any work
    from adtrain.errors import ConfigError

    (tmp_path / "afile").write_text("x")
    for kwargs, key in (({"out": str(tmp_path)}, "out"), ({"out": str(tmp_path / "afile" / "m.ckpt")}, "out"),
                        ({"recompress": "maybe"}, "recompress")):  # (maybe recompressed: taken as true)
        with pytest.raises(ConfigError) as err:
            add_images(str(tmp_path / "updated.ckpt"), str(img_dir), **kwargs)
        assert err.value.key == key, str(err.value)


def test_hetmm_tiny_set_and_category_values(fast_cfg, tmp_path):
    from adtrain.build import build_method
    from adtrain.run import run

    cfg = fast_cfg("method=hetmm", "method.templates=5")
    res = run(cfg, tmp_path)
    from adtrain.loading import load_method

    m, _, _ = load_method(tmp_path / "checkpoints" / "model.ckpt")
    assert m.model.num_templates == 5 and bool(m.model.compressed)
    assert res["image_auroc"] > 0.7  # 5 compressed templates still rank the defects
    # official per-category values are applied for an MVTec category, explicit values win
    method = build_method(fast_cfg("method=hetmm"))
    method.apply_category("bottle")
    assert method.model.forward_windows == [5, 5, 7] and method.model.lambdas == [1.0, 1.0, 0.8]
    method2 = build_method(fast_cfg("method=hetmm", "method.forward_windows=[3,3,3]"))
    method2.apply_category("bottle")
    assert method2.model.forward_windows == [3, 3, 3] and method2.model.backward_windows == [3, 3, 3]
    # only on MVTec AD, whose table it is: Real-IAD's zipper keeps the defaults
    from types import SimpleNamespace

    from adtrain.data import MVTecDataModule, RealIADDataModule

    for dm, windows in ((MVTecDataModule(root=str(tmp_path), category="zipper"), [13, 7, 7]),
                        (RealIADDataModule(root=str(tmp_path), category="zipper"), [13, 9, 7])):
        other = build_method(fast_cfg("method=hetmm"))
        other.__dict__["_trainer"] = SimpleNamespace(datamodule=dm)
        other.on_fit_start()
        assert other.model.forward_windows == windows, type(dm)
    # values travel with the state dict
    state = method.state_dict()
    fresh = build_method(fast_cfg("method=hetmm"))
    fresh.load_state_dict(state)
    assert fresh.model.forward_windows == [5, 5, 7]
    assert torch.isfinite(torch.tensor(np.array(fresh.model.lambdas))).all()


def test_hetmm_shared_tiny_set_stays_k_sheets_across_tasks(fast_cfg, tmp_path):
    from adtrain.loading import load_method
    from adtrain.run import run

    run(fast_cfg("method=hetmm", "method.templates=4", "schedule.tasks=[texture,grid]",
                 "method.forward_windows=[3,3,3]", "method.backward_windows=[1,1,1]"), tmp_path)
    sizes = [load_method(p)[0].model.num_templates for p in sorted((tmp_path / "tasks").glob("*/model.ckpt"))]
    assert sizes == [4, 4]


def test_hetmm_post_relu_run_is_rebuilt_with_its_tap(fast_cfg, tmp_path):
    from adtrain.loading import load_method
    from adtrain.run import run

    res = run(fast_cfg("method=hetmm", "method.feature_tap=post_relu"), tmp_path)
    assert res["image_auroc"] > 0.7
    method, cfg, _ = load_method(tmp_path / "checkpoints" / "model.ckpt")
    assert cfg.method.feature_tap == "post_relu"
    assert method.model.feature_tap == "post_relu" and not method.model.extractor.pre_activation
