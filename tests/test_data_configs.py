"""Each src/adtrain/conf/data/*.yaml composes with a root config and instantiates through Hydra."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from adtrain.data import (AnomalyDataModule, ElpvDataModule, FolderDataModule, MVTecDataModule,
                          SyntheticDataModule, VisADataModule)
from adtrain.data.testing import write_mvtec_tree, write_visa_tree

CONF = Path(__file__).resolve().parents[1] / "src" / "adtrain" / "conf" / "data"
EXPECTED = {"mvtec": MVTecDataModule, "visa": VisADataModule, "folder": FolderDataModule,
            "elpv": ElpvDataModule, "synthetic": SyntheticDataModule}
COMMON_KEYS = {"image_size", "center_crop", "batch_size", "eval_batch_size", "num_workers", "val_split",
               "seed", "shots", "augment", "synthetic_anomaly", "category", "cache", "cache_dir",
               "device_normalize", "resize"}


def _compose(name: str, tmp_path: Path, **overrides):
    data = OmegaConf.load(CONF / f"{name}.yaml")
    root = OmegaConf.create({"seed": 7, "method": {"batch_size": 2, "image_size": [32, 32], "center_crop": None},
                             "paths": {"data_dir": "data", "cache_dir": str(tmp_path / "cache")}})  # paths/default.yaml
    root.data = data
    for k, v in overrides.items():
        OmegaConf.update(root, f"data.{k}", v)
    cfg = OmegaConf.to_container(root.data, resolve=True)
    assert cfg.pop("name") == name
    return cfg


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_yaml_composes_and_instantiates(name, tmp_path):
    raw = OmegaConf.load(CONF / f"{name}.yaml")
    assert raw["_target_"] == f"{EXPECTED[name].__module__}.{EXPECTED[name].__name__}"
    assert COMMON_KEYS <= set(raw.keys())
    assert OmegaConf.to_container(raw)["batch_size"] == "${method.batch_size}"
    overrides = {"num_workers": 0}
    if name == "mvtec":
        overrides["root"] = str(write_mvtec_tree(tmp_path / "mvtec", "bottle"))
    elif name == "visa":
        overrides["root"] = str(write_visa_tree(tmp_path / "visa", ("candle",)))
    elif name == "folder":
        overrides["normal_dir"] = str(write_mvtec_tree(tmp_path / "f", "c") / "c" / "train" / "good")
    elif name == "synthetic":
        overrides.update(num_train=4, num_test_normal=2, num_test_anomalous=2, size=32)
    cfg = _compose(name, tmp_path, **overrides)
    dm = instantiate(cfg)
    assert type(dm) is EXPECTED[name] and isinstance(dm, AnomalyDataModule)
    assert dm.batch_size == 2 and dm.image_size == (32, 32) and dm.seed == 7 and dm.val_split == 0.2
    if name != "elpv":  # elpv: only a cheap check, no decoding of the full set here
        batch = next(iter(dm.test_dataloader()))
        # data.device_normalize=auto: uint8, normalised on the model's device (tests/test_device_norm.py)
        assert batch["image"].shape[1:] == (3, 32, 32) and batch["image"].dtype == torch.uint8


def test_yaml_augment_targets_are_instantiated(tmp_path):
    cfg = _compose("synthetic", tmp_path, num_workers=0, num_train=3, size=32,
                   augment=[{"_target_": "albumentations.HorizontalFlip", "p": 1.0}])
    dm = instantiate(cfg)
    import albumentations as A
    assert len(dm.augment) == 1 and isinstance(dm.augment[0], A.HorizontalFlip)


def test_mvtec_root_default_reads_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MVTEC_ROOT", str(tmp_path / "elsewhere"))
    cfg = _compose("mvtec", tmp_path)
    assert cfg["root"] == str(tmp_path / "elsewhere")
    monkeypatch.delenv("MVTEC_ROOT")
    assert _compose("mvtec", tmp_path)["root"] == "data/mvtec"


def test_elpv_poly_gets_its_own_perlin_opacity_and_mono_keeps_the_default():
    """data/elpv.yaml's by_category: poly's Perlin anomalies at 25-85 % opacity, mono's (and every
    other option of both) as the family's defaults."""
    from tests.conftest import compose

    from adtrain.data.validation import ValAnomalies

    spec = ValAnomalies.from_any(compose("data=elpv").data.val_anomalies)
    mono, poly = spec.generator("perlin", "mono").config, spec.generator("perlin", "poly").config
    assert mono.beta == (0.75, 0.95) and poly.beta == (0.25, 0.85)
    assert {k: v for k, v in vars(poly).items() if k != "beta"} == {k: v for k, v in vars(mono).items() if k != "beta"}
    assert spec.generator("cutpaste", "poly") is spec.generator("cutpaste", "mono")


# ---------------------------------------------------------------- data.resize (adtrain.data.resize)
def _image(h, w, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)  # smooth part + noise: both aliasing and edges show
    yy, xx = np.mgrid[0:h, 0:w]
    base = (127 + 100 * np.sin(xx / 3.0) * np.cos(yy / 5.0))[..., None] + rng.normal(0, 20, (h, w, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("src,dst", [((300, 300), (256, 256)), ((700, 1024), (256, 256)), ((50, 40), (64, 72))])
def test_default_resize_is_torchvision_resize_of_the_pil_image(src, dst):
    """pil_bilinear (default) = torchvision.transforms.functional.resize of the PIL image, bit for bit
    (down- and upscale); pil_lanczos = the same with LANCZOS (CFA's Image.ANTIALIAS)."""
    import numpy as np
    import torchvision.transforms.functional as TF
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    from adtrain.data.transforms import build_transform

    img = _image(*src)
    for rule, mode in (("pil_bilinear", InterpolationMode.BILINEAR), ("pil_lanczos", InterpolationMode.LANCZOS)):
        ref = np.asarray(TF.resize(Image.fromarray(img), list(dst), interpolation=mode))
        kw = {} if rule == "pil_bilinear" else {"resize": rule}
        out = build_transform(dst, normalize=False, **kw)(image=img)["image"].permute(1, 2, 0).numpy()
        assert out.dtype == np.uint8 and np.array_equal(out, ref), rule


def test_cv2_linear_is_the_previous_albumentations_resize_and_masks_stay_nearest():
    import albumentations as A
    import cv2
    import numpy as np
    from albumentations.pytorch import ToTensorV2

    from adtrain.data.transforms import build_transform

    img, mask = _image(300, 280), (_image(300, 280, 1)[..., 0] > 140).astype(np.uint8)
    old = A.Compose([A.Resize(256, 240, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST),
                     A.CenterCrop(224, 224), ToTensorV2()], mask_interpolation=cv2.INTER_NEAREST, seed=0)
    ref = old(image=img, mask=mask)
    new = build_transform((256, 240), (224, 224), normalize=False, resize="cv2_linear")(image=img, mask=mask)
    assert torch.equal(new["image"], ref["image"]) and torch.equal(new["mask"], ref["mask"])
    pil = build_transform((256, 240), (224, 224), normalize=False)(image=img, mask=mask)
    assert torch.equal(pil["mask"], ref["mask"]) and not torch.equal(pil["image"], ref["image"])


def test_resize_rule_leaves_the_random_stream_and_seeded_compose_alone():
    """The resize draws no random number: with augmentation, every rule flips the same items (the
    masks, resized alike by every rule, come out equal), and A.Compose(seed=0) repeats itself."""
    import albumentations as A
    import numpy as np

    from adtrain.data.transforms import build_transform

    aug = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    img, mask = _image(90, 70), np.tri(90, 70, dtype=np.uint8)
    outs = {}
    for rule in ("pil_bilinear", "pil_lanczos", "cv2_linear", "pil_bilinear"):
        t = build_transform((48, 40), augment=aug, normalize=False, resize=rule)
        outs.setdefault(rule, []).append([t(image=img, mask=mask) for _ in range(12)])
    first, again = outs["pil_bilinear"]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    assert len({x["mask"].sum(0).argmax().item() for x in first}) > 1  # both flip states drawn
    for rule in ("pil_lanczos", "cv2_linear"):
        assert all(torch.equal(a["mask"], b["mask"]) for a, b in zip(first, outs[rule][0])), rule


@pytest.mark.parametrize("rule", ["pil_bilinear", "pil_lanczos", "cv2_linear"])
def test_the_graphs_resize_is_the_rule(rule):
    """resize_tensor (an export's preprocessing): the PIL rules bit for bit, cv2_linear within a grey
    level (float bilinear against OpenCV's fixed point); a same-size image passes unchanged."""
    import numpy as np

    from adtrain.data.resize import resize_image, resize_tensor

    for src, dst in (((300, 300), (256, 256)), ((117, 203), (64, 48)), ((40, 30), (64, 64)), ((64, 64), (64, 64)),
                     ((700, 1024), (256, 224))):
        img = _image(*src)
        out = resize_tensor(torch.from_numpy(img).permute(2, 0, 1)[None].float(), dst, rule)
        diff = np.abs(out[0].permute(1, 2, 0).numpy() - resize_image(img, dst, rule).astype(np.float32))
        assert diff.max() <= (0 if rule != "cv2_linear" or src == dst else 1), (rule, src, dst)


@pytest.mark.parametrize("rule", ["pil_bilinear", "pil_lanczos"])
def test_the_graphs_resize_blocks_hold_every_weight_of_the_full_matrix(rule):
    """The graph's PIL resize reads, per block of outputs, only the inputs its filters reach: the
    blocks put together are PIL's full weight matrix, every other input weighs exactly 0."""
    from adtrain.data.resize import RESIZE_BLOCK, pil_block, pil_weights

    for n_in, n_out in ((1024, 256), (300, 256), (203, 48), (30, 64), (999, 77), (64, 64)):
        full = pil_weights(n_in, n_out, rule)
        rebuilt = torch.zeros_like(full)
        for o0 in range(0, n_out, RESIZE_BLOCK):
            w, idx = pil_block(n_in, o0, min(o0 + RESIZE_BLOCK, n_out), n_out, rule)
            if n_in == 1024:  # scale 4: a block's own 128 inputs and the filter's reach each side
                assert idx.numel() <= RESIZE_BLOCK * 4 + 2 * 3 * 4 + 4, idx.numel()
            rebuilt[o0:o0 + w.shape[0], idx] = w
        assert torch.equal(rebuilt, full), (rule, n_in, n_out)


def test_resize_key_follows_the_method_recipe_and_names_bad_values(tmp_path):
    from tests.conftest import compose

    from adtrain.errors import ConfigError

    assert {m: compose(f"method={m}").data.resize for m in ("patchcore", "stfpm", "hetmm", "dfm", "cfa")} == {
        "patchcore": "pil_bilinear", "stfpm": "pil_bilinear", "hetmm": "pil_bilinear", "dfm": "pil_bilinear",
        "cfa": "pil_lanczos"}
    assert compose("method=cfa", "data.resize=cv2_linear").data.resize == "cv2_linear"
    assert _compose("mvtec", tmp_path)["resize"] == "pil_bilinear"  # a method config without the key
    with pytest.raises(ConfigError, match="data.resize"):
        MVTecDataModule(root=str(tmp_path), category="x", resize="bilinear")


def test_configs_made_before_the_key_read_as_cv2_linear():
    from adtrain.data.resize import with_legacy_rule
    from adtrain.inference.graph import Preprocessing
    from adtrain.loading import checked_config

    old = {"image_size": [256, 256], "center_crop": None, "mean": [0.5] * 3, "std": [0.2] * 3}
    assert Preprocessing.from_dict(old).resize == "cv2_linear"
    pre = Preprocessing.from_dict({**old, "resize": "pil_lanczos"})
    assert pre.resize == "pil_lanczos" and Preprocessing.from_dict(pre.to_dict()) == pre
    stored = {"method": {"name": "stfpm"}, "data": {"_target_": "adtrain.data.mvtec.MVTecDataModule"}}
    assert checked_config(stored, "x.ckpt")["data"]["resize"] == "cv2_linear" and "resize" not in stored["data"]
    assert with_legacy_rule({"data": {"resize": "pil_bilinear"}})["data"]["resize"] == "pil_bilinear"
