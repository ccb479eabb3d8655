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
               "device_normalize"}


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
