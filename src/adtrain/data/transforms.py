"""Albumentations pipelines: resize (``data.resize``: adtrain.data.resize) (+ CenterCrop) + augment +
ImageNet Normalize + ToTensorV2 (without Normalize: uint8 tensors, normalised on the device by
adtrain.data.device_norm)."""

from __future__ import annotations

from typing import Any, Sequence

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from adtrain.data.resize import DEFAULT, ImageResize
from adtrain.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python (lists/dicts); anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def instantiate_if_config(obj: Any, key: str) -> Any:
    """A `_target_` dict (or DictConfig) -> the object Hydra builds from it; objects unchanged."""
    obj_plain = to_plain(obj)
    if isinstance(obj_plain, dict):
        if "_target_" not in obj_plain:
            raise ConfigError(key, f"expected an object or a dict with '_target_', got {obj_plain!r}")
        import warnings

        from hydra.utils import instantiate

        try:
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                built = instantiate(obj_plain)
        except Exception as e:  # Hydra wraps import/argument errors (pydantic's over several lines)
            why = " ".join(str(e.__cause__ or e).split()).split(" For further information visit")[0]
            why = why.split(", set env var HYDRA_FULL_ERROR")[0]
            raise ConfigError(key, f"cannot instantiate {obj_plain['_target_']}: {why}") from None
        for w in said:  # albumentations warns of an argument it does not take (p misspelt) and ignores it
            if "not valid for transform" in str(w.message):
                raise ConfigError(key, f"{obj_plain['_target_']}: {' '.join(str(w.message).split())}")
        return built
    return obj


def dataclass_from_any(cls, cfg, key: str):
    """A frozen config dataclass from None (defaults), an instance, or a dict of its fields (lists
    become tuples); unknown or missing fields -> ConfigError naming ``key``."""
    if cfg is None:
        return cls()
    if isinstance(cfg, cls):
        return cfg
    try:
        return cls(**{k: (tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v)
                      for k, v in dict(to_plain(cfg)).items()})
    except TypeError as err:
        raise ConfigError(key, str(err)) from None


def build_augment(augment: Sequence | None) -> list:
    """augment: list of albumentations transforms or `_target_` dicts -> list of transforms."""
    augment = to_plain(augment)
    if augment is None:
        return []
    if not isinstance(augment, (list, tuple)):
        augment = [augment]
    out = []
    for i, t in enumerate(augment):
        t = instantiate_if_config(t, f"data.augment[{i}]")
        if not isinstance(t, A.BasicTransform | A.BaseCompose):
            raise ConfigError(f"data.augment[{i}]", f"not an albumentations transform: {t!r}")
        out.append(t)
    return out


def check_augment_keeps_size(transforms: list, size: tuple[int, int], trials: int = 16) -> None:
    """Every training image must come out of ``data.augment`` at the model's input size: a transform
    that turns a non-square input (RandomRotate90, Transpose, D4) or crops it (RandomResizedCrop to
    another size) gave a batch of mixed shapes (a traceback), or a model trained at another size or
    orientation than it is tested at (PatchCore's bank of transposed features, with no word). Each
    transform applied with certainty (p=1) to a blank input, ``trials`` seeds (a random choice such
    as RandomRotate90's turn), the first that changes the size named."""
    import copy

    if not transforms:
        return
    h, w = size
    sure = []
    for t in transforms:
        t = copy.deepcopy(t)
        t.p = 1.0
        sure.append(t)
    for trial in range(trials):
        image, mask = np.zeros((h, w, 3), np.uint8), np.zeros((h, w), np.uint8)
        first = None
        for i, t in enumerate(sure):
            out = A.Compose([t], seed=trial)(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
            if first is None and image.shape[:2] != (h, w):
                first = (i, image.shape[:2])
        if image.shape[:2] != (h, w):
            i, (oh, ow) = first
            raise ConfigError(f"data.augment[{i}]", f"{type(transforms[i]).__name__} turns the {h} x {w} training "
                              f"input (method.image_size / method.center_crop) into {oh} x {ow}: every training "
                              "image must keep the input size the model is tested at; use a transform that keeps "
                              "it (a turn or transpose needs a square input), or give the crop the input's size")


def check_crop(center_crop, image_size, key: str = "data.center_crop") -> None:
    """A centre crop ([H, W] or None) no larger than the resized image, named ``key`` where not."""
    if center_crop is not None and any(c > s for c, s in zip(center_crop, image_size)):
        raise ConfigError(key, f"{list(center_crop)} is larger than image_size {list(image_size)}: set it no "
                          f"larger, or {key}=null for no crop")


def size_pair(value, key: str) -> tuple[int, int] | None:
    """An int or [H, W] -> (H, W); None stays None."""
    value = to_plain(value)
    if value is None:
        return None
    if isinstance(value, int):
        value = [value, value]
    try:
        h, w = (int(v) for v in value)
        if any(isinstance(v, bool) or float(v) != int(v) for v in value):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(key, f"expected a whole number or [height, width] of whole numbers, got {value!r}") from None
    if h <= 0 or w <= 0:
        raise ConfigError(key, f"sizes must be positive, got {value!r}")
    return h, w


def build_transform(image_size: tuple[int, int], center_crop: tuple[int, int] | None = None,
                    augment: Sequence | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    normalize: bool = True, resize: str = DEFAULT) -> A.Compose:
    """Resize (the image by the rule ``resize``, the mask nearest) [+ CenterCrop] [+ augment]
    [+ Normalize] + ToTensorV2.

    normalize=False: the image stays uint8 (C,H,W); ``DeviceNormalize(mean, std)`` later gives the
    very tensor Normalize would have (adtrain.data.device_norm)."""
    steps = [ImageResize(image_size[0], image_size[1], resize)]
    if center_crop is not None:
        check_crop(center_crop, image_size)
        steps.append(A.CenterCrop(center_crop[0], center_crop[1]))
    steps += list(augment or [])
    if normalize:
        steps.append(A.Normalize(mean=mean, std=std, max_pixel_value=255.0))
    steps.append(ToTensorV2())
    return A.Compose(steps, mask_interpolation=cv2.INTER_NEAREST, seed=0)
