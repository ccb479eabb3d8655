"""data.device_normalize: uint8 batches leave the DataLoader and are normalised on the device, bit
for bit as the workers' float path did (adtrain.data.device_norm)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from adtrain.data.device_norm import DeviceNormalize, device_normalizer, normalize_batch
from adtrain.data.testing import write_mvtec_tree
from adtrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform
from adtrain.errors import ConfigError
from adtrain.methods.base import AnomalyModule

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _dm(root, mode, **kw):
    from adtrain.data.mvtec import MVTecDataModule

    opts = dict(image_size=[40, 36], center_crop=[32, 30], batch_size=3, num_workers=0, seed=0, cache="off",
                val_anomalies={"families": ["cutpaste", "perlin"], "per_normal": 1})
    return MVTecDataModule(root=str(root), category="widget", device_normalize=mode, **{**opts, **kw})


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_mvtec_tree(tmp_path_factory.mktemp("mvtec"), "widget", n_train=8, n_test_good=2,
                            defects={"crack": 3}, defects_without_gt={"hole": 1}, size=50)


def _batches(loader, seed=0):
    torch.manual_seed(seed)  # the training set's shuffle and augmentation seeds come from torch's RNG
    return list(loader)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("mean,std", [(IMAGENET_MEAN, IMAGENET_STD), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                                      ((0.1, 0.9, 0.33), (0.07, 1.3, 0.5))])
def test_device_normalize_equals_albumentations_normalize_exactly(mean, std):
    rng = np.random.default_rng(0)
    norm = DeviceNormalize(mean, std)
    for shape in ((67, 53, 3), (32, 30, 3), (1, 256, 3)):
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        img[0, :3] = [[0, 0, 0], [255, 255, 255], [1, 128, 254]]
        mask = np.zeros(shape[:2], np.uint8)
        old = build_transform((40, 36), (32, 30), None, mean, std)(image=img, mask=mask)["image"].float()
        raw = build_transform((40, 36), (32, 30), None, mean, std, normalize=False)(image=img, mask=mask)["image"]
        assert raw.dtype == torch.uint8 and raw.shape == old.shape
        new = norm(raw.unsqueeze(0).expand(2, -1, -1, -1))
        assert new.dtype == torch.float32 and torch.equal(new[0], old) and torch.equal(new[1], old)
        assert torch.equal(norm._gather(raw.unsqueeze(0))[0], old)  # the GPU's gather, run on the CPU
    floats = torch.randn(2, 3, 4, 4)
    assert norm(floats) is floats  # already normalised: passed through


def test_every_uint8_value_round_trips_through_denormalize():
    """viz.denormalize of the normalised image is the uint8 image, for all 256 values of each
    channel: a heatmap drawn from a uint8 batch is the one drawn from the float batch."""
    from adtrain.viz import denormalize

    v = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).expand(3, 16, 16).contiguous()
    v[1] = v[1].flip(0)
    assert np.array_equal(denormalize(device_normalizer()(v)), v.permute(1, 2, 0).numpy())
    assert np.array_equal(denormalize(v), v.permute(1, 2, 0).numpy())


def test_loader_batches_are_uint8_and_normalise_to_the_float_path(tree):
    cut = {"_target_": "adtrain.data.cutpaste.CutPaste", "p": 0.5}
    on, off = _dm(tree, "auto", synthetic_anomaly=cut), _dm(tree, "off", synthetic_anomaly=cut)
    method = AnomalyModule()
    loaders = ("train_dataloader", "val_dataloader", "val_normal_dataloader", "test_dataloader")
    for name in loaders:
        got, want = _batches(getattr(on, name)()), _batches(getattr(off, name)())
        assert len(got) == len(want) > 0
        for g, w in zip(got, want):
            assert g["image"].dtype == torch.uint8 and w["image"].dtype == torch.float32, name
            assert g["image"].shape == w["image"].shape == (len(g["path"]), 3, 32, 30)
            _same(normalize_batch(g, on.input_normalizer), w)
            _same(method.on_after_batch_transfer(g, 0), w)  # the trainer's hook (no datamodule: ImageNet's)
            assert torch.equal(method.model_input(g["image"]), w["image"])
    # the validation set has both synthetic families, the training set CutPaste anomalies
    defects = {d for b in _batches(on.val_dataloader()) for d in b["defect"]}
    assert {"good", "synthetic_cutpaste", "synthetic_perlin"} <= defects
    assert any(d == "synthetic" for b in _batches(on.train_dataloader()) for d in b["defect"])


def test_augmented_training_set_keeps_the_float_path(tree):
    flip = [{"_target_": "albumentations.HorizontalFlip", "p": 0.5}]
    on, off = _dm(tree, "auto", augment=flip), _dm(tree, "off", augment=flip)
    assert not on.uint8_images(train=True) and on.uint8_images(train=False)
    for g, w in zip(_batches(on.train_dataloader()), _batches(off.train_dataloader())):
        assert g["image"].dtype == torch.float32
        _same(g, w)
    assert next(iter(on.test_dataloader()))["image"].dtype == torch.uint8
    assert on.predict_dataset([on.test_samples[0].path])[0]["image"].dtype == torch.float32  # outside a trainer


def test_the_data_modules_statistics_are_used(tree):
    class Half(type(_dm(tree, "auto"))):
        mean = (0.5, 0.5, 0.5)
        std = (0.25, 0.5, 0.125)

    on, off = Half(**_dm_kwargs(tree, "auto")), Half(**_dm_kwargs(tree, "off"))
    assert on.input_normalizer.mean == (0.5, 0.5, 0.5) and on.input_normalizer.std == (0.25, 0.5, 0.125)
    g, w = next(iter(on.test_dataloader())), next(iter(off.test_dataloader()))
    _same(normalize_batch(g, on.input_normalizer), w)
    method = AnomalyModule()
    method.input_norm = on.input_normalizer
    _same(method.on_after_batch_transfer(g, 0), w)


def _dm_kwargs(root, mode):
    return dict(root=str(root), category="widget", image_size=[40, 36], center_crop=None, batch_size=4,
                num_workers=0, seed=0, cache="off", val_anomalies=None, device_normalize=mode)


def test_bad_value_names_the_key(tree):
    with pytest.raises(ConfigError, match="data.device_normalize"):
        _dm(tree, "sometimes")
    assert _dm(tree, False).device_normalize == "off" and _dm(tree, True).device_normalize == "auto"


@cuda
def test_cuda_batch_moves_as_uint8_and_normalises_exactly(tree):
    on, off = _dm(tree, "auto"), _dm(tree, "off")
    g, w = next(iter(on.test_dataloader())), next(iter(off.test_dataloader()))
    assert g["image"].is_pinned()
    dev = g["image"].to("cuda", non_blocking=True)
    assert dev.dtype == torch.uint8
    assert torch.equal(on.input_normalizer(dev).cpu(), w["image"])


@pytest.mark.parametrize("method", ["stfpm", "cfa"])
def test_run_results_identical_with_device_normalize_on_and_off(fast_cfg, tmp_path, method):
    """End to end (training, validation with synthetic anomalies, thresholds, test, heatmaps): the
    metrics of results.json, every score in scores.csv and the heatmap PNGs are bit-identical."""
    from adtrain.run import run

    base = [f"method={method}", "backbone=resnet18", "backbone.pretrained=false", "method.image_size=[48,48]",
            "method.center_crop=null", "method.batch_size=8", "output.heatmaps=2", "data.num_train=16",
            "data.num_test_normal=6", "data.num_test_anomalous=6", "trainer.max_epochs=1",
            f"paths.cache_dir={tmp_path / 'cache'}"]
    res = {mode: run(fast_cfg(*base, f"data.device_normalize={mode}"), tmp_path / mode) for mode in ("auto", "off")}
    keys = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_aupro",
            "val_image_auroc", "val_pixel_auroc", "threshold")
    saved = {m: json.loads((tmp_path / m / "results.json").read_text()) for m in res}
    assert [saved["auto"].get(k) for k in keys] == [saved["off"].get(k) for k in keys]
    assert saved["auto"]["image_auroc"] is not None and saved["auto"]["threshold"] is not None
    assert (tmp_path / "auto" / "scores.csv").read_bytes() == (tmp_path / "off" / "scores.csv").read_bytes()
    maps = {m: sorted((tmp_path / m / "heatmaps").glob("*.png")) for m in res}
    assert [p.name for p in maps["auto"]] == [p.name for p in maps["off"]] and len(maps["auto"]) == 2
    for a, b in zip(maps["auto"], maps["off"]):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
